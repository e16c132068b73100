# Set-up, tests and the demo. Every target creates or reuses .venv with the pinned CPU stack.
# GPU users: see README "Installing on a CUDA machine" (CUDA=1 is not automated here on purpose).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.mkt-installed

# torch first, pinned: an unpinned torch pulls the CUDA build. The local `fbgemm-gpu` alias is installed in
# the same command so torchrec's `fbgemm-gpu` requirement resolves to fbgemm-gpu-cpu (see README).
CPU_STACK := torch==2.13.0 fbgemm-gpu-cpu==1.8.0 ./third_party/fbgemm_gpu_cpu_alias torchrec==1.8.0 torchx==0.7.0

.PHONY: install java redis test demo experiment bench clean

install: $(STAMP) java redis

# Java for `mkt build --engine spark` (pyspark runs a JVM): Debian's headless JRE 17 where none is installed.
# Without root or apt the Spark tests are skipped with their reason; nothing else needs Java.
java:
	@command -v java >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		openjdk-17-jre-headless >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends default-jre-headless >/dev/null); } || \
		echo "warning: no Java here: the Spark engine's tests will be skipped (install a JRE 17 or 21)" >&2

# Redis for the knowledge cache's serving store (tests/cache start a redis-server on localhost): Debian's package
# where none is installed. Without root or apt the Redis tests are skipped with their reason; the SQLite store needs
# nothing.
redis:
	@command -v redis-server >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		redis-server >/dev/null; } || \
		echo "warning: no redis-server here: the Redis knowledge-cache tests will be skipped" >&2

$(STAMP): pyproject.toml third_party/fbgemm_gpu_cpu_alias/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check $(CPU_STACK) pyarrow pandas numpy pyyaml tqdm redis \
		scikit-learn matplotlib jinja2 pytest kubernetes tensorboard fsspec s3fs 'moto[server]' duckdb sqlglot pyspark
	$(PIP) install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	$(PIP) check
	@if $(PIP) list 2>/dev/null | grep -qiE '^nvidia-|^triton '; then \
		echo "error: a CUDA package was installed into $(VENV); see README 'Installing'" >&2; exit 1; fi
	touch $(STAMP)

test: install
	$(PY) -m pytest -q --durations=30 tests

# The demo: MKT, its own MEM and the TEM alone, fine-tuning and two single-domain baselines, 3 seeds each (under 10
# minutes on 2 cores). The full table adds no_hfa, no_pdl and mmoe: rerun with them (finished runs are reused).
DEMO_RUNS ?= mkt no_tem_finetune no_mem_pretrain finetune mlp din

demo: install
	$(VENV)/bin/mkt run --config configs/quickstart.yaml --out out/quickstart --seeds 3 --baseline mkt \
		--runs $(DEMO_RUNS)

# The power experiment (README "How sure are these numbers?"): MKT against Finetune and against its own MEM over 10
# seeds, then how many seeds and test users an interval of +-0.005 GAUC needs (tools/power.py).
experiment: install
	$(VENV)/bin/mkt run --config configs/quickstart.yaml --out out/experiment --seeds 10 --baseline finetune \
		--runs mkt no_tem_finetune finetune
	$(PY) tools/power.py out/experiment/report/report.json --model mkt --half-width 0.005

bench: install
	$(PY) tools/bench_data.py

clean:
	rm -rf $(VENV) out build *.egg-info
