# Two entry points: `make reproduce` (every notebook, default profile, into results/) and
# `make test` (unit tests + notebooks under the ci profile with nbval). Both build .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= default
ONLY ?=
export MPLBACKEND := agg

.PHONY: reproduce test unit notebooks world benchmarks clean-venv

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

reproduce: $(STAMP)
	$(BIN)/python -m replication reproduce --profile $(PROFILE) $(if $(ONLY),--only $(ONLY))

# Notebooks under nbval write their tables and figures to .test-results/, never over results/, and run
# in this venv's own kernel (--nbval-current-env), whatever kernelspecs the user has installed.
test: $(STAMP)
	REPLICATION_RESULTS="$(CURDIR)/.test-results" $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 600 -q

# Re-execute notebooks/ in place (their ci parameters): the stored outputs that nbval compares.
notebooks: $(STAMP)
	$(BIN)/python -m replication notebooks $(if $(ONLY),--only $(ONLY))

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q

world: $(STAMP)
	$(BIN)/python -m replication world --profile $(PROFILE) --out data/concept_world_$(PROFILE)

benchmarks: $(STAMP)
	@status=0; for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || status=1; done; exit $$status

clean-venv:
	rm -rf $(VENV)
