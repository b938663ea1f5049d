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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.errors import AlreadyExistsError, LorafleetError, StoreError, ValidationError

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _configure_sqlite(engine: Engine) -> None:
    """SQLite: enforce foreign keys, WAL for concurrent readers, and ``BEGIN IMMEDIATE`` for every
    transaction so two writers queue on the lock (``busy_timeout``) instead of failing to upgrade it."""

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
        conn.exec_driver_sql("BEGIN IMMEDIATE")


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
    return create_engine(url, **kwargs)


#: the transaction ``Database.transaction()`` holds open on this thread or task, and its database
_AMBIENT: ContextVar[tuple[Database, Session] | None] = ContextVar("lorafleet_ambient_session", default=None)


@contextmanager
def _translated_errors() -> Iterator[None]:
    """Driver errors as ``lorafleet.errors`` (the caller has rolled back what they belong to)."""
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
        raise StoreError(f"database error: {exc.orig}") from exc


class Database:
    """An engine plus a session factory; ``session()`` is the unit of work of every store method."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = create_db_engine(url, **engine_kwargs)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error; driver errors become ``StoreError``.
        Inside ``transaction()``: that transaction's session, in a savepoint released on success and rolled
        back on error (the outer transaction goes on and commits or rolls back as a whole)."""
        ambient = _AMBIENT.get()
        if ambient is not None and ambient[0] is self:
            with _translated_errors(), ambient[1].begin_nested():
                yield ambient[1]
            return
        session = self._sessions()
        try:
            with _translated_errors():
                try:
                    yield session
                    session.commit()
                except BaseException:
                    session.rollback()
                    raise
        finally:
            session.close()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction for everything the block does through this database: committed when the block ends,
        rolled back (all of it) when it raises. ``session()`` calls inside join it (see the module)."""
        ambient = _AMBIENT.get()
        if ambient is not None and ambient[0] is self:
            raise RuntimeError("Database.transaction() is already open on this thread")
        with self.session() as session:
            token = _AMBIENT.set((self, session))
            try:
                yield session
            finally:
                _AMBIENT.reset(token)

    @contextmanager
    def unit_of_work(self) -> Iterator[None]:
        """Several store operations that commit together (or not at all): a new ``transaction()``, or inside one
        already open on this thread, a savepoint of it (so a caller's transaction composes with this block)."""
        ambient = _AMBIENT.get()
        context = self.session() if ambient is not None and ambient[0] is self else self.transaction()
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

    def ping(self) -> None:
        """One trivial query: raises ``StoreError`` when the database cannot be reached (a readiness check)."""
        with self.session() as session:
            session.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
