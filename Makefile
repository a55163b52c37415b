# Gate: `make run` starts the gateway on embedded defaults, `make test` runs the suite.
# Needs only python3 (>= 3.11) and make: everything else is installed into .venv from requirements.lock.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench bench-quick bench-soak lock clean image image-run chart

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Gate needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

run: install
	$(BIN)/gate serve

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

# The container image, built with podman (as root, no daemon). Where no registry is reachable the first build makes
# the base image with debootstrap (2-3 min, cached in /var/cache/gate-image-base); `docker build .` works as well.
IMAGE ?= localhost/gate:latest
image:
	deploy/image/build.sh $(IMAGE)

# Run it on the host's network: http://127.0.0.1:8080/actuator/health (development auth, events in a volume).
image-run: image
	deploy/image/podman.sh run --rm --network host --env ANTHROPIC_API_KEY --volume gate-data:/app/data $(IMAGE)

# The Helm chart rendered (and linted) through Helm's library: build/gate-chart.yaml. VALUES=path/to/values.yaml
chart: install
	@mkdir -p build
	$(BIN)/python deploy/helm/render.py $(if $(VALUES),-f $(VALUES)) > build/gate-chart.yaml
	@echo "rendered build/gate-chart.yaml"

# The full suite (~18 min, unattended): rewrites benchmarks/RESULTS.md and benchmarks/results/latest.json.
bench: install
	$(BIN)/python benchmarks/run.py

# One short round; writes benchmarks/.work/RESULTS-quick.md.
bench-quick: install
	$(BIN)/python benchmarks/run.py --quick

# The 10-minute soak of Gate alone; writes benchmarks/.work/RESULTS-partial.md.
bench-soak: install
	$(BIN)/python benchmarks/run.py --phases soak --soak-minutes 10

# Re-resolve the pinned dependency set after editing pyproject.toml.
lock: install
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache data build
