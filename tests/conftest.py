import os
import shutil

# The Triton interpreter must be chosen before anything imports triton.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small synthetic data set (images, text corpus, tokenizer), generated once per session."""
    from tools.make_synthetic_data import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(str(out), num_samples=400, seed=0)
    return str(out)


def tiny_overrides(data_dir: str, run_dir: str, **extra) -> list[str]:
    """Overrides that point the tiny preset at ``data_dir`` and keep a run small and quiet."""
    base = {
        "data.meta_path": f"{data_dir}/meta.json",
        "data.text_corpus": f"{data_dir}/text.jsonl",
        "data.tokenizer": f"{data_dir}/tokenizer.model",
        "data.max_packed_tokens": 512,
        "data.max_sample_tokens": 512,
        "data.max_dynamic_patch": 2,
        "train.global_batch": 8,
        "train.warmup_steps": 2,
        "train.progress": False,
        "train.tensorboard": False,
        "run.dir": run_dir,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test, printed so a failure can be rerun (KERNELS_TEST_SEED=N)."""
    s = int(os.environ.get("KERNELS_TEST_SEED", int.from_bytes(os.urandom(4), "little") % 2**31))
    print(f"random seed {s} (rerun with KERNELS_TEST_SEED={s})")
    torch.manual_seed(s)
    return s
