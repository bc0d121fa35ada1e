# The two commands: `make demo` and `make test`. Everything else is for contributors.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-stores test-transaction-mode reliability test-schemathesis test-isolation test-celery test-sqlite test-postgres test-mariadb lint typecheck docs tox clean bench bench-cleanup bench-statements bench-tasks bench-dashboard bench-scale profile

# pytest exits with 5 when it collected no tests (a -k/-m that selects nothing): not a failure.
PYTEST := $(BIN)/python -m pytest -q
NOTHING_COLLECTED_IS_FINE := || [ $$? -eq 5 ]

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## demo: set up the example project on SQLite and run the scripted tour against it.
demo: $(STAMP)
	$(BIN)/python example_project/demo.py

## test: the suite but the reliability set, on SQLite, then on PostgreSQL and MariaDB when
## they are reachable (set REQUIRE_SERVER_DATABASES=1 to fail instead of skipping one).
test: $(STAMP)
	TEST_DATABASE=sqlite $(PYTEST) -m "not reliability and not celery_worker and not stores" $(NOTHING_COLLECTED_IS_FINE)
	$(BIN)/python tests/run_server_databases.py -m "not reliability and not celery_worker and not stores"

## test-stores: the behaviour, race and conformance suites over every store (database,
## cached, Redis standalone and Redis Cluster), on SQLite, then PostgreSQL and MariaDB.
test-stores: $(STAMP)
	TEST_DATABASE=sqlite $(PYTEST) -m "stores and not reliability" $(NOTHING_COLLECTED_IS_FINE)
	$(BIN)/python tests/run_server_databases.py -m "stores and not reliability"

## test-transaction-mode: the behaviour and concurrency suites, then the fault and state-machine
## suites, again with CLAIM_MODE = "transaction", on PostgreSQL (the one database that mode
## runs on: SQLite and MariaDB use the lease whatever it says).
test-transaction-mode: $(STAMP)
	IDEMPOTENCY_TEST_CLAIM_MODE=transaction TEST_DATABASE=postgres $(PYTEST) -m "not reliability and not celery_worker and not stores"
	IDEMPOTENCY_TEST_CLAIM_MODE=transaction TEST_DATABASE=postgres $(PYTEST) -m reliability tests/test_faults.py tests/test_state_machine.py

## reliability: the fault, load, security and hostile-input tests alone, on SQLite, then on
## PostgreSQL and MariaDB (gunicorn against the real databases).
reliability: $(STAMP)
	TEST_DATABASE=sqlite $(PYTEST) -m "reliability and not schemathesis" $(NOTHING_COLLECTED_IS_FINE)
	$(BIN)/python tests/run_server_databases.py -m "reliability and not schemathesis"

## test-schemathesis: schemathesis (coverage, fuzzing and stateful phases) against the example
## project's OpenAPI schema through gunicorn, on SQLite: the slowest reliability test, alone.
test-schemathesis: $(STAMP)
	TEST_DATABASE=sqlite $(PYTEST) -m schemathesis tests/test_schemathesis.py

## test-isolation: the concurrency suites on PostgreSQL at REPEATABLE READ and SERIALIZABLE
## and on MariaDB at REPEATABLE READ (READ COMMITTED is what `make test` runs).
ISOLATION_SUITES := tests/test_concurrency.py tests/test_atomic_requests.py \
	tests/test_isolation.py tests/test_semantics.py tests/test_functions.py
test-isolation: $(STAMP)
	$(BIN)/python tests/run_server_databases.py --isolation $(ISOLATION_SUITES)

## test-celery: idempotent tasks through real Celery workers, on RabbitMQ and on Redis, with
## the records on PostgreSQL.
test-celery: $(STAMP)
	TEST_DATABASE=postgres $(PYTEST) -m celery_worker tests/test_celery_tasks.py

test-sqlite: $(STAMP)
	TEST_DATABASE=sqlite $(PYTEST) -m "not reliability and not celery_worker and not stores" $(NOTHING_COLLECTED_IS_FINE)

test-postgres: $(STAMP)
	TEST_DATABASE=postgres $(PYTEST) -m "not reliability and not celery_worker and not stores" $(NOTHING_COLLECTED_IS_FINE)

test-mariadb: $(STAMP)
	TEST_DATABASE=mariadb $(PYTEST) -m "not reliability and not celery_worker and not stores" $(NOTHING_COLLECTED_IS_FINE)

## docs: build the documentation site (MkDocs, warnings are errors) into site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy idempotency_django

# Every pyenv-installed 3.11/3.12/3.13 on PATH, so tox finds the whole matrix.
PYENV_BINS := $(shell root=$$(pyenv root 2>/dev/null) && for v in 3.13 3.12 3.11; do \
	d=$$(ls -d "$$root"/versions/$$v.* 2>/dev/null | tail -n 1); [ -n "$$d" ] && printf '%s/bin:' "$$d"; done)

## tox: the Python x Django matrix on SQLite (interpreters that are missing are skipped).
tox: $(STAMP)
	PATH="$(PYENV_BINS)$$PATH" $(BIN)/tox run-parallel --parallel 2 --parallel-no-spinner

clean:
	rm -rf $(VENV) .tox .mypy_cache .ruff_cache .pytest_cache build dist site *.egg-info

## bench: this package beside the other Django idempotency packages, through gunicorn on
## PostgreSQL (each peer in its own virtualenv under benchmarks/.venvs/; writes docs/benchmarks.md).
bench: $(STAMP)
	$(BIN)/python benchmarks/compare.py

## bench-cleanup: batched cleanup vs plain DELETE, and p99 of live requests while it runs, on
## PostgreSQL and MariaDB (writes docs/benchmarks.md).
bench-cleanup: $(STAMP)
	$(BIN)/python benchmarks/cleanup.py

## bench-tasks: an idempotent Celery task beside a plain one, through a real worker on Redis,
## records on PostgreSQL (prints ratios; figures kept in docs/benchmarks.md).
bench-tasks: $(STAMP)
	$(BIN)/python benchmarks/tasks.py

## bench-dashboard: the admin dashboard's page time as the record table grows to 5 million
## rows, on PostgreSQL (writes docs/benchmarks.md).
bench-dashboard: $(STAMP)
	$(BIN)/python benchmarks/dashboard.py

## bench-scale: first request, replay, 409 and 422 latency beside the bare endpoint as the
## record table grows to 10 million rows, on PostgreSQL and MariaDB, with bytes per record
## and cleanup rate (SIZES=10000,100000 for a quick run; writes docs/benchmarks.md).
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale.py $(if $(SIZES),--sizes $(SIZES))

## profile: py-spy flame graphs of the peer benchmark's endpoint, bare and with this package in
## both claim modes, and how each request's time splits between this package, Django, the
## database driver and gunicorn (installs py-spy into the virtualenv; output in
## benchmarks/.profiles/).
profile: $(STAMP)
	$(BIN)/python -m pip install --quiet py-spy
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python benchmarks/profile.py

## bench-statements: each hand-written SQL statement of the database storage beside its ORM
## form, on PostgreSQL (prints ratios; figures kept in docs/benchmarks.md).
bench-statements: $(STAMP)
	$(BIN)/python benchmarks/statements.py
