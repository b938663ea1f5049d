"""Engine and session handling: one ``Database`` per process, one managed session per store operation.

Each repository method runs inside ``Database.session()``, which commits on success and rolls back on any
exception, translating driver errors into ``lorafleet.errors`` at this boundary.

``Database.transaction()`` makes several store operations one transaction: every ``session()`` opened inside it
(on the same thread or task, on the same ``Database``) joins it as a savepoint instead of committing on its own,
so an operation that fails inside still rolls back alone (as it would have), and nothing is committed until the
outer block ends. The API's idempotency keys use it to store a response in the transaction of its write.

Above the store nothing holds a session: ``Database.run(operation, ...)`` calls one repository operation (a
function whose first argument is the session) in a session of its own, which joins the open transaction, and
``Database.unit_of_work()`` is the transaction a workflow opens so that several such calls commit together.

Read-only transactions (``Database.read(operation, ...)``, the twin of ``run``; ``session(read_only=True)``;
``unit_of_work(read_only=True)``) are for lookups that must not wait behind writers, such as the serving API's
per-request ones. SQLite begins every other transaction with ``BEGIN IMMEDIATE``, which takes the database's one
write lock (so two writers queue instead of failing to upgrade a lock); a read-only one begins with a plain
deferred ``BEGIN``, which in WAL mode reads the last committed data while a writer holds the lock. A deferred
transaction that then wrote could fail to upgrade (``SQLITE_BUSY``), so a read-only transaction refuses writes:
SQLite's ``PRAGMA query_only`` is on for it (every transaction sets it on or off as it begins), and PostgreSQL
runs it as ``SET TRANSACTION READ ONLY``; a write in one is ``ReadOnlyTransactionError`` and changes nothing.
Inside an open ``transaction()`` a read-only session joins it like any other (and is then as writable as it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.errors import (
    AlreadyExistsError,
    LorafleetError,
    ReadOnlyTransactionError,
    StoreError,
    ValidationError,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: the execution option (on ``Database``'s read-only engine) that makes the "begin" event start a read-only
#: transaction, and the ``Session.info`` key that marks a read-only session
_READ_ONLY = "lorafleet_read_only"
#: PostgreSQL's SQLSTATE for a write in a read-only transaction (``read_only_sql_transaction``)
_PG_READ_ONLY_SQLSTATE = "25006"


def _configure_sqlite(engine: Engine) -> None:
    """SQLite: enforce foreign keys, WAL for concurrent readers, and ``BEGIN IMMEDIATE`` for every
    transaction so two writers queue on the lock (``busy_timeout``) instead of failing to upgrade it; a
    read-only transaction is a deferred ``BEGIN`` with ``query_only`` on (see the module)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event emit BEGIN itself
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(_READ_ONLY):
            conn.exec_driver_sql("PRAGMA query_only=ON")
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("PRAGMA query_only=OFF")  # the connection's last transaction may have set it
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _configure_postgresql(engine: Engine) -> None:
    """PostgreSQL: a read-only transaction is ``SET TRANSACTION READ ONLY`` (it ends with the transaction)."""

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(_READ_ONLY):
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")


def create_db_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for a ``sqlite://`` or ``postgresql+psycopg://`` URL with lorafleet's settings."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "postgresql":
        _configure_postgresql(engine)
    return engine


#: the transaction ``Database.transaction()`` holds open on this thread or task, and its database
_AMBIENT: ContextVar[tuple[Database, Session] | None] = ContextVar("lorafleet_ambient_session", default=None)


def _is_read_only_refusal(exc: DBAPIError) -> bool:
    """Whether the driver refused a write because the transaction is read-only (SQLite's ``query_only``: the
    ``SQLITE_READONLY`` code; PostgreSQL: SQLSTATE 25006)."""
    orig = exc.orig
    return (
        getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY
        or getattr(orig, "sqlstate", None) == _PG_READ_ONLY_SQLSTATE
    )


@contextmanager
def _translated_errors(*, read_only: bool = False) -> Iterator[None]:
    """Driver errors as ``lorafleet.errors`` (the caller has rolled back what they belong to); in a read-only
    session, a refused write is ``ReadOnlyTransactionError``."""
    try:
        yield
    except LorafleetError:
        raise
    except IntegrityError as exc:
        raise AlreadyExistsError(f"conflicts with an existing row: {exc.orig}") from exc
    except DataError as exc:
        # a value the column cannot hold (a number out of range, NUL in text): the input's fault. The API
        # checks its inputs before any query; this keeps anything it missed a 4xx, never a 500.
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else "invalid value"
        raise ValidationError(f"a value the database cannot store ({reason})") from exc
    except (OperationalError, DBAPIError) as exc:
        if read_only and _is_read_only_refusal(exc):
            raise ReadOnlyTransactionError(f"a write in a read-only transaction: {exc.orig}") from exc
        raise StoreError(f"database error: {exc.orig}") from exc


class Database:
    """An engine plus a session factory; ``session()`` is the unit of work of every store method."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = create_db_engine(url, **engine_kwargs)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # the same connection pool; the execution option makes the "begin" event start a read-only transaction
        read_only_engine = self.engine.execution_options(**{_READ_ONLY: True})
        self._read_only_sessions = sessionmaker(
            read_only_engine, expire_on_commit=False, info={_READ_ONLY: True}
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        """A session that commits on success and rolls back on error; driver errors become ``StoreError``.
        Inside ``transaction()``: that transaction's session, in a savepoint released on success and rolled
        back on error (the outer transaction goes on and commits or rolls back as a whole). ``read_only``: a
        read-only transaction (see the module) unless it joins an open one."""
        ambient = _AMBIENT.get()
        if ambient is not None and ambient[0] is self:
            joined = ambient[1]
            with _translated_errors(read_only=bool(joined.info.get(_READ_ONLY))), joined.begin_nested():
                yield joined
            return
        session = (self._read_only_sessions if read_only else self._sessions)()
        try:
            with _translated_errors(read_only=read_only):
                try:
                    yield session
                    session.commit()
                except BaseException:
                    session.rollback()
                    raise
        finally:
            session.close()

    @contextmanager
    def transaction(self, *, read_only: bool = False) -> Iterator[Session]:
        """One transaction for everything the block does through this database: committed when the block ends,
        rolled back (all of it) when it raises. ``session()`` calls inside join it (see the module)."""
        ambient = _AMBIENT.get()
        if ambient is not None and ambient[0] is self:
            raise RuntimeError("Database.transaction() is already open on this thread")
        with self.session(read_only=read_only) as session:
            token = _AMBIENT.set((self, session))
            try:
                yield session
            finally:
                _AMBIENT.reset(token)

    @contextmanager
    def unit_of_work(self, *, read_only: bool = False) -> Iterator[None]:
        """Several store operations that commit together (or not at all): a new ``transaction()``, or inside one
        already open on this thread, a savepoint of it (so a caller's transaction composes with this block).
        ``read_only``: several lookups as of one moment, in a new read-only transaction (see the module)."""
        ambient = _AMBIENT.get()
        joins = ambient is not None and ambient[0] is self
        context = self.session() if joins else self.transaction(read_only=read_only)
        with context:
            yield

    @contextmanager
    def outside_transaction(self) -> Iterator[None]:
        """Store calls in the block commit on their own even inside an open ``transaction()`` (what must outlive
        the caller's transaction). Use it before that transaction has written anything: a second writer waits
        for the first (SQLite's database lock, PostgreSQL's row locks)."""
        ambient = _AMBIENT.get()
        token = _AMBIENT.set(None if ambient is not None and ambient[0] is self else ambient)
        try:
            yield
        finally:
            _AMBIENT.reset(token)

    def run(
        self, operation: Callable[Concatenate[Session, _P], _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """``operation(session, *args, **kwargs)`` in a ``session()``: its own transaction, or a savepoint of the
        open ``transaction()`` / ``unit_of_work()``. How code above the store calls a repository."""
        with self.session() as session:
            return operation(session, *args, **kwargs)

    def read(
        self, operation: Callable[Concatenate[Session, _P], _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """``run`` for an operation that only reads: in a read-only transaction of its own, which on SQLite does
        not wait for a writer (see the module), or a savepoint of the open ``transaction()``. A write in it is
        ``ReadOnlyTransactionError``."""
        with self.session(read_only=True) as session:
            return operation(session, *args, **kwargs)

    def ping(self) -> None:
        """One trivial query: raises ``StoreError`` when the database cannot be reached (a readiness check)."""
        with self.session(read_only=True) as session:
            session.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
