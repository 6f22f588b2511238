import os
import shutil

# The Triton interpreter must be chosen before anything imports triton.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
# One thread per process, whatever the caller's environment: the multi-process tests run up to 8
# processes on 2 cores (more threads only oversubscribe them and make every wait a spin), and
# intra-op thread counts change the order of floating-point reductions, so a verdict must not
# depend on them. Subprocesses (torchrun, the CLIs) inherit these variables.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import hashlib  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already set, or parallel work has started (a plugin imported torch first)
    pass

import pytest  # noqa: E402


def _test_seed(nodeid: str) -> int:
    """A seed fixed by the test's id: the same in every run and whatever ran before it."""
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:4], "little") % 2**31


@pytest.fixture(autouse=True)
def _seed_every_test(request):
    """Every test starts from random states fixed by its own id (not by the tests that ran before)."""
    s = _test_seed(request.node.nodeid)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


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
def seed(request) -> int:
    """The test's own fixed seed (from its id); KERNELS_TEST_SEED=N overrides it to explore others."""
    s = int(os.environ.get("KERNELS_TEST_SEED", _test_seed(request.node.nodeid)))
    print(f"random seed {s} (override with KERNELS_TEST_SEED=N)")
    torch.manual_seed(s)
    return s


def zero_as_rank(model, rank: int, world: int):
    """``(ZeroAdamW, its flat shard, its master slice)`` over ``model`` as rank ``rank`` of ``world``
    data-parallel ranks would hold them, in one process (the slice bounds are set by hand; the master
    slice still holds this process's flattening: tests overwrite it)."""
    from engine.parallel.data_parallel import ZeroAdamW

    opt = ZeroAdamW([{"params": list(model.parameters()), "weight_decay": 0.0, "dp_group": None}], 1e-3,
                    (0.9, 0.999), 1e-8)
    shard = opt.shards[0]
    shard.padded = -(-shard.numel // world) * world
    chunk = shard.padded // world
    shard.start, shard.end = rank * chunk, rank * chunk + chunk
    return opt, shard, opt.param_groups[0]["params"][0]


def record_at_save(trainer, step: int, record) -> None:
    """Call ``record()`` when ``trainer`` saves the checkpoint of ``step``, before it is written."""
    save = trainer.save

    def recording_save():
        if trainer.step == step:
            record()
        return save()

    trainer.save = recording_save
