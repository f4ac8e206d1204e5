"""Test setup: 8 fake CPU devices, set before anything imports jax."""

import os

# The tests' programs are tiny and compiled once or twice each: compile time, not run
# time, is most of the suite's, and LLVM's cheaper optimization level takes about a
# quarter off it (tests/test_decoding.py: 212 s -> 161 s on the 2-core machine, same
# results). Processes the tests start get the same flags (train_runs.env).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" {FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count=8"
                           ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The real datasets live beside the checkout (../shared/data), in CI too.
SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                           "data"))
os.environ.setdefault("IFT_JAX_DATA_DIR", SHARED_DATA)

# Many tests (and the training processes some of them start) compile the same tiny
# programs: a compilation cache shared by this session's processes compiles each
# once. A fresh directory per session, so nothing outlives the run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    _CACHE = tempfile.mkdtemp(prefix="ift_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# `make test` gives whole files to two workers in collection order (`--dist loadfile`):
# the slowest files go first, so the run does not end with one long file on one
# worker while the other idles. Measured (pytest --durations=0, 2026-11-30); files
# not listed keep their order after these.
SLOWEST_FILES = (
    "test_preemption.py", "test_benchmarks.py", "test_studies.py", "test_suite_eval.py",
    "test_sweeps.py", "test_decoding.py", "test_remat_scan.py", "test_serving.py",
    "test_train.py", "test_eval_mesh.py", "test_plan.py", "test_multihost.py",
    "test_evaluation.py", "test_peft_methods.py", "test_train_peft_methods.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable.


import pytest  # noqa: E402  (after the environment above, which jax must see first)


@pytest.fixture(scope="session")
def small_sentencepiece(tmp_path_factory):
    """A real SentencePiece model of at most 60 pieces (T5's special ids), trained here."""
    import sentencepiece
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog"
                                for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=60,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return folder / "spiece.model"
