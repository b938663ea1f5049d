"""The SQL metadata store: the ORM models, the database handle, the migrations runner and one repository per
concern (tenants and users, feedback, jobs, registry rows, QA reports, routing and enrolments, idempotency).

Everything that touches SQLAlchemy lives here: sessions, rows and dialect differences stop at this package's
functions and repositories, which take and return the ``lorafleet.domain`` types.
"""
