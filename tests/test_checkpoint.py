"""Checkpoints: exact resume, crash safety, retention, bad checkpoints, pickle payloads, export parity."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from llava_loop.checkpoint import files as checkpoint
from llava_loop.checkpoint.files import CheckpointError

import helpers
from helpers import K, N, bitwise_equal, final_state, steps_by_number, trajectory

# this module's runs: helpers.RESUMED_TRAIN, and LoRA's settings where mode=lora
RUN = {"train": helpers.RESUMED_TRAIN, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}


def _defaults(**sections) -> dict:
    """``run_config``'s sections for this module: RUN, each of ``sections`` merged over RUN's (a dict updates it,
    anything else replaces it)."""
    return helpers.merged(RUN, sections)


@pytest.mark.slow
# each worker count and each batching once: the position is the sampler's (main process), the same with or
# without workers, so (0, tokens) and (2, fixed) added nothing these two miss; the data-position control runs in both
@pytest.mark.parametrize("workers, batching", [(0, "fixed"), (2, "tokens")])
def test_interrupted_and_resumed_run_is_bitwise_identical(
    workers, batching, tmp_path, run_config, tiny_dropout_model_dir
):
    """Fixed micro-batches, and packed micro-batches filled to a token budget (their size varies)."""
    hooks = ["plugins:FinalState", "plugins:StopAtStep"]
    stop = {"LLAVA_TEST_STOP_AT": str(K)}
    never = {"LLAVA_TEST_STOP_AT": "-1"}
    data = {"num_workers": workers}
    if batching == "tokens":
        data.update(max_tokens_per_micro_batch=360, padding_free=True)  # 1 to 3 samples of 117-132 tokens
    a = run_config("A", model=tiny_dropout_model_dir, **_defaults(hooks=hooks, data=data))
    helpers.launch(a, extra_env=never)
    b = run_config("B", model=tiny_dropout_model_dir, **_defaults(hooks=hooks, data=data))
    helpers.launch(b, extra_env=stop)  # stops after step K with a checkpoint, exit code 0
    assert sorted(p.name for p in (tmp_path / "B" / "checkpoints").iterdir()) == [f"step-{K:06d}"]
    helpers.launch(b, extra_env=never)  # run C: resume=auto in B's output dir, in a fresh process

    steps_a, steps_bc = steps_by_number(tmp_path / "A"), steps_by_number(tmp_path / "B")
    assert sorted(steps_bc) == list(range(1, N + 1))
    assert trajectory(steps_a, 1, N) == trajectory(steps_bc, 1, N)  # loss, grad norm, lr, sample ids: exact
    assert bitwise_equal(final_state(tmp_path / "A"), final_state(tmp_path / "B"))  # params, AdamW moments, next draws

    if batching == "tokens":
        assert len({len(m["sample_ids"]) for m in steps_a.values()}) > 1  # micro-batch sizes really varied
    # negative controls: each missing piece of state breaks equality
    faults = (("no-rng-restore", "dropout masks"), ("no-data-position", "sample order"))
    for fault, broken in faults if batching == "fixed" else faults[1:]:
        control = tmp_path / f"B-{fault}"
        config = run_config(f"B-{fault}", model=tiny_dropout_model_dir, **_defaults(hooks=hooks, data=data))
        helpers.launch(config, extra_env=stop)
        helpers.launch(config, extra_env=never, fault=fault)
        after = steps_by_number(control)
        assert trajectory(steps_a, 1, K) == trajectory(after, 1, K)
        assert trajectory(steps_a, K + 1, N) != trajectory(after, K + 1, N), broken
        assert not bitwise_equal(final_state(tmp_path / "A"), final_state(control)), broken
    ids_a = [steps_a[s]["sample_ids"] for s in range(K + 1, N + 1)]
    ids_replayed = [after[s]["sample_ids"] for s in range(K + 1, N + 1)]
    assert ids_replayed == [steps_a[s]["sample_ids"] for s in range(1, N - K + 1)] and ids_replayed != ids_a


@pytest.mark.slow
@pytest.mark.floor
def test_resume_under_two_process_deepspeed_matches(tmp_path, run_config, tiny_dropout_model_dir):
    hooks = ["plugins:StopAtStep"]
    a = run_config("A", model=tiny_dropout_model_dir, **_defaults(hooks=hooks, train={"micro_batch_size": 1}))
    helpers.launch(a, processes=2, extra_env={"LLAVA_TEST_STOP_AT": "-1"})
    b = run_config("B", model=tiny_dropout_model_dir, **_defaults(hooks=hooks, train={"micro_batch_size": 1}))
    helpers.launch(b, processes=2, extra_env={"LLAVA_TEST_STOP_AT": str(K)})
    assert (tmp_path / "B" / "checkpoints" / f"step-{K:06d}" / "pytorch_model").is_dir()  # DeepSpeed engine files
    helpers.launch(b, processes=2, extra_env={"LLAVA_TEST_STOP_AT": "-1"})
    steps_a, steps_bc = steps_by_number(tmp_path / "A"), steps_by_number(tmp_path / "B")
    assert sorted(steps_bc) == list(range(1, N + 1))
    for s in range(1, N + 1):
        assert abs(steps_a[s]["loss"] - steps_bc[s]["loss"]) <= 1e-6 * abs(steps_a[s]["loss"]), s
        assert steps_a[s]["sample_ids"] == steps_bc[s]["sample_ids"]
    # and a resume with a different number of processes is refused with the way out
    out = helpers.launch(b, "train.max_steps=8", processes=0, check=False)
    assert out.returncode == 2
    assert "world_size=2" in out.stderr and "world_size=1" in out.stderr and "llava-loop export" in out.stderr


@pytest.mark.slow
def test_kill_during_save_keeps_the_previous_checkpoint_and_retention(tmp_path, run_config):
    config = run_config(**_defaults(checkpoint={"every": 1, "keep_last": 2}))
    out = helpers.launch(config, fault="kill-in-save:4", check=False)
    assert out.returncode == -signal.SIGKILL
    root = tmp_path / "run" / "checkpoints"
    complete = [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run")]
    assert complete == ["step-000002", "step-000003"]  # pruning happened only after each save completed
    assert (root / ".tmp-step-000004").is_dir() and not (root / ".tmp-step-000004" / "COMPLETE").exists()
    for name in complete:
        checkpoint.verify(root / name)  # intact, every file matches its manifest
    resumed = helpers.launch(config)
    assert "ignoring incomplete checkpoint folders" in resumed.stderr and ".tmp-step-000004" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step-000003 at step 3" in resumed.stderr
    steps = [m["step"] for m in helpers.metrics(tmp_path / "run")]
    assert steps == [1, 2, 3, 4, 4, 5, 6]  # step 4 ran again after the crash
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run")] == ["step-000005", "step-000006"]
    assert not (root / ".tmp-step-000004").exists()  # the stale partial save was cleaned up


@pytest.mark.slow
@pytest.mark.parametrize("workers, target", [(0, "process"), (2, "process group")])
def test_sigterm_saves_a_complete_checkpoint_and_exits_zero(workers, target, tmp_path, run_config):
    """SIGTERM to the main process, or to its whole process group as Slurm and Kubernetes send it (DataLoader
    workers included): finish the step, save, exit 0."""
    config = run_config(**_defaults(train={"max_steps": 400}, data={"num_workers": workers}))
    cmd = [sys.executable, str(helpers.ROOT / "train.py"), "--config", str(config)]
    proc = subprocess.Popen(
        cmd, cwd=helpers.ROOT, env=helpers.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < 3):
        time.sleep(0.2)
    if target == "process group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert "received SIGTERM" in stderr.decode()
    last = helpers.metrics(tmp_path / "run")[-1]["step"]
    assert 3 <= last < 400
    saved = checkpoint.complete_checkpoints(tmp_path / "run")
    assert [p.name for p in saved] == [f"step-{last:06d}"]
    checkpoint.verify(saved[0])
    helpers.train_here(config, f"train.max_steps={last + 2}")
    assert [m["step"] for m in helpers.metrics(tmp_path / "run")][-2:] == [last + 1, last + 2]


def _rewrite_manifest(path):
    (path / checkpoint.COMPLETE).unlink()
    (path / checkpoint.MANIFEST).unlink()
    checkpoint.write_manifest(path)
    (path / checkpoint.COMPLETE).write_text("")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, shapes_data):
    """A short full-mode run with a final checkpoint, copied fresh for each test that damages it."""
    tmp = tmp_path_factory.mktemp("finished")
    config = helpers.write_config(
        tmp / "run.yaml",
        model=tiny_model_dir,
        shapes=shapes_data,
        output_dir=tmp / "run",
        **_defaults(train={"max_steps": 2}),
    )
    helpers.train_here(config)
    return tmp / "run" / "checkpoints" / "step-000002", config


def _damaged_copy(finished_run, tmp_path):
    import shutil

    source, config = finished_run
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target, config


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", r"file optimizer.bin listed in MANIFEST.json is missing"),
        ("corrupt", r"file model.safetensors does not match its sha256"),
        ("truncated", r"file optimizer.bin has \d+ bytes, expected \d+"),
        ("incomplete", r"is incomplete \(no COMPLETE marker\)"),
        ("manifest", r"MANIFEST.json is unreadable"),
        ("world_size", r"written with world_size=4 but this run has world_size=1.*llava-loop export"),
        ("mode", r"written with mode='full' but this run has mode='projector'"),
    ],
)
def test_bad_checkpoints_get_clear_errors(damage, message, finished_run, tmp_path, fresh_accelerate_state):
    from llava_loop.config import load_config
    from llava_loop.loop import Trainer

    ckpt, config = _damaged_copy(finished_run, tmp_path)
    overrides = [f"resume={ckpt}", f"output_dir={tmp_path / 'out'}"]
    if damage == "missing":
        (ckpt / "optimizer.bin").unlink()
    elif damage == "corrupt":
        data = bytearray((ckpt / "model.safetensors").read_bytes())
        data[-100] ^= 0xFF
        (ckpt / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncated":
        (ckpt / "optimizer.bin").write_bytes((ckpt / "optimizer.bin").read_bytes()[:-10])
    elif damage == "incomplete":
        (ckpt / "COMPLETE").unlink()
    elif damage == "manifest":
        (ckpt / "MANIFEST.json").write_text('{"files": {"model.safe')
    elif damage == "world_size":
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state["run"]["world_size"] = 4
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        _rewrite_manifest(ckpt)
    elif damage == "mode":
        overrides.append("mode=projector")
    with pytest.raises(CheckpointError, match=message):
        Trainer(load_config(config, overrides))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['LLAVA_PWNED']}",))


def test_a_pickled_code_payload_is_refused(finished_run, tmp_path, fresh_accelerate_state, monkeypatch):
    from llava_loop.config import load_config
    from llava_loop.loop import Trainer

    ckpt, config = _damaged_copy(finished_run, tmp_path)
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("LLAVA_PWNED", str(pwned))
    torch.save({"torch": torch.get_rng_state(), "evil": _Payload()}, ckpt / "rng_state_0.pt")
    _rewrite_manifest(ckpt)  # even a consistent manifest does not make it loadable
    with pytest.raises(CheckpointError, match=r"rng_state_0.pt: refused to load.*posix.system|rng_state_0.pt: refused"):
        Trainer(load_config(config, [f"resume={ckpt}", f"output_dir={tmp_path / 'out'}"]))
    assert not pwned.exists()
    with pytest.raises(CheckpointError, match="refused to load"):
        checkpoint.safe_torch_load(ckpt / "rng_state_0.pt")
    assert not pwned.exists()


@pytest.mark.slow
def test_frozen_weights_are_not_saved(tmp_path, run_config):
    sizes = {}
    for mode in ("full", "projector", "lora"):
        config = run_config(mode, **_defaults(mode=mode, train={"max_steps": 1}))
        helpers.train_here(config)
        ckpt = tmp_path / mode / "checkpoints" / "step-000001"
        sizes[mode] = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    assert sizes["projector"] < 0.1 * sizes["full"], sizes
    assert sizes["lora"] < 0.3 * sizes["full"], sizes


@pytest.mark.slow
@pytest.mark.parametrize("mode, processes", [("full", 0), ("lora", 2)])  # merged and adapter; 1 and 2 processes
def test_export_matches_the_trained_model(mode, processes, tmp_path, run_config, tiny_dropout_model_dir):
    """Exported logits equal the in-training model's; the adapter loads with plain PEFT on the base."""
    config = run_config(
        model=tiny_dropout_model_dir,
        **_defaults(
            mode=mode,
            hooks=["plugins:FinalLogits"],
            train={"max_steps": 3, "micro_batch_size": 2 if not processes else 1},
        ),
    )
    helpers.launch(config, processes=processes)
    ckpt = checkpoint.complete_checkpoints(tmp_path / "run")[-1]
    exported = helpers.export_and_rerun_logits(
        ckpt, tmp_path / "run", tmp_path / "export", adapter_base=tiny_dropout_model_dir if mode == "lora" else None
    )
    reference = torch.load(tmp_path / "run" / "final_logits.pt")
    assert set(exported) == ({"merged", "adapter"} if mode == "lora" else {"merged"})
    for logits in exported.values():
        assert (logits - reference["logits"]).abs().max() < 1e-5
    # negative control: the untrained base model is far from the trained one
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_dropout_model_dir).eval()
    with torch.no_grad():
        untrained = base(**reference["inputs"]).logits
    assert (untrained - reference["logits"]).abs().max() > 1e-2


class _Counter:
    """A stateful part of the kind a user might add: anything with state_dict / load_state_dict."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def _plain_run():
    """A real Accelerator and plain backend, and a two-layer model (the first frozen) one optimizer step in."""
    from accelerate import Accelerator

    from llava_loop.backends import PlainBackend

    acc = Accelerator(cpu=True)
    backend = PlainBackend(acc)
    backend.configure(None)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    net[0].requires_grad_(False)  # frozen: never saved
    model, optimizer = acc.prepare(net, torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return acc, backend, model, optimizer


def test_the_checkpointer_round_trips_stateful_parts_without_a_trainer(tmp_path, fresh_accelerate_state):
    """The Checkpointer is handed an accelerator, a backend, a model and stateful parts, and nothing else."""
    from llava_loop.checkpoint.checkpointer import Checkpointer
    from llava_loop.loop import TrainState

    acc, backend, model, optimizer = _plain_run()
    counter = _Counter()
    identity = {"world_size": 1, "backend": "plain"}

    def checkpointer(run_identity, mode="full"):
        return Checkpointer(
            acc,
            backend,
            model,
            tmp_path,
            progress=TrainState(),
            states={"counter": counter},
            run_facts=run_identity,
            config_yaml=f"mode: {mode}\n",
            every=0,
            keep_last=0,
            verify="hash",
        )

    counter.n = 7
    path = checkpointer(identity).save(3)
    trained = [p.detach().clone() for p in model.parameters()]
    moments = [v.clone() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == {"1.weight", "1.bias"}
    counter.n = 0
    with torch.no_grad():
        model[1].weight.add_(1.0)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()

    found = checkpointer(identity).find_resume("auto")
    assert found[0] == path and found[1]["counter"] == {"n": 7} and found[1]["run"] == identity
    with pytest.raises(CheckpointError, match=r"written with mode='full' but this run has mode='lora'"):
        checkpointer(identity, mode="lora").load(*found)  # negative control: a different run is refused
    checkpointer(identity).load(*found)
    assert counter.n == 7
    assert all(torch.equal(a, b) for a, b in zip(trained, model.parameters()))
    assert all(
        torch.equal(a, b)
        for a, b in zip(moments, [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)])
    )


def test_a_hook_with_state_is_restored_on_resume(tmp_path, run_config):
    """A hook with state_dict/load_state_dict (a running mean of the loss) resumes where it stopped, with no edit of
    the loop: a 2-step run resumed to 3 ends with the mean of all 3 losses. Negative controls: a hook without the
    methods (RecordCalls) is not saved, and a run that does not resume starts the hook from its initial state."""
    config = run_config(
        **_defaults(
            train={"max_steps": 2, "micro_batch_size": 1, "grad_accum": 1},
            data={"num_workers": 0},
            hooks=["plugins:RunningLoss", "plugins:RecordCalls"],
        )
    )
    helpers.train_here(config)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-000002" / "hook_state_0.pt", weights_only=True)
    assert list(saved) == ["plugins:RunningLoss"] and saved["plugins:RunningLoss"]["count"] == 2
    helpers.train_here(config, "train.max_steps=3")
    count, mean = 0, 0.0
    for row in helpers.metrics(tmp_path / "run"):
        count += 1
        mean += (row["loss"] - mean) / count
    assert count == 3 and json.loads((tmp_path / "run" / "running_loss.json").read_text()) == {"count": 3, "mean": mean}
    helpers.train_here(config, "resume=overwrite", "train.max_steps=1")
    assert json.loads((tmp_path / "run" / "running_loss.json").read_text())["count"] == 1  # from 0, not from 3
    # a state a resume could not load (a numpy scalar) is refused when the run starts, naming the hook: it used to
    # save, pass verification, and fail every resume
    with pytest.raises(checkpoint.CheckpointError, match=r"hook plugins:NumpyMean: its state_dict\(\) holds numpy"):
        helpers.train_here(config, "resume=overwrite", "hooks=plugins:NumpyMean")


def test_an_overwritten_run_set_aside_goes_once_the_new_run_has_a_complete_checkpoint(tmp_path, fresh_accelerate_state):
    """resume=overwrite sets the previous run's checkpoints aside. They survive a save of the new run that never
    completes (the negative control: the only complete copy stays, intact) and a keep_last=0 run (keep all), and
    go with the first prune after a complete save; the previous run's metrics stay."""
    from llava_loop.checkpoint.checkpointer import Checkpointer
    from llava_loop.loop import TrainState

    acc, backend, model, _ = _plain_run()

    def checkpointer(keep_last, kind=Checkpointer):
        return kind(
            acc,
            backend,
            model,
            tmp_path,
            progress=TrainState(),
            states={},
            run_facts={"world_size": 1},
            config_yaml="x: 1\n",
            every=0,
            keep_last=keep_last,
            verify="hash",
        )

    class DiesWhileSealing(Checkpointer):
        def seal(self, tmp, final, files):
            raise OSError("killed while sealing")

    checkpointer(1).save(4)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert checkpointer(1).find_resume("overwrite") is None
    (aside,) = tmp_path.glob("checkpoints.replaced-*")
    with pytest.raises(OSError, match="killed while sealing"):
        checkpointer(1, DiesWhileSealing).save(1)
    assert checkpoint.complete_checkpoints(tmp_path) == [] and checkpoint.verify(aside / "step-000004")
    checkpointer(0).save(1)
    assert (aside / "step-000004" / "COMPLETE").is_file()
    checkpointer(1).save(2)
    assert not aside.exists() and [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-000002"]
    assert len(list(tmp_path.glob("metrics.replaced-*.jsonl"))) == 1


@pytest.mark.slow
def test_two_process_checkpoints_are_hashed_by_every_rank_and_need_every_ranks_files(tmp_path, run_config):
    config = run_config(
        **_defaults(train={"micro_batch_size": 1, "max_steps": 2}, hooks=["plugins:ProcessGroupTimeout"])
    )
    helpers.launch(config, "train.dist_timeout_minutes=7", processes=2)
    assert float((tmp_path / "run" / "pg_timeout.txt").read_text()) == 7 * 60  # the setting reached the process group
    ckpt = checkpoint.complete_checkpoints(tmp_path / "run")[-1]
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    assert {meta["rank"] for meta in manifest["files"].values()} == {0, 1}  # both processes hashed a share
    assert manifest["world_size"] == 2 and "rng_state_{rank}.pt" in manifest["per_rank"]
    assert "pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in manifest["per_rank"]
    checkpoint.verify(ckpt)
    # a checkpoint without process 1's files is incomplete, even with a manifest that matches what is there
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    (damaged / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    del manifest["files"]["pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    (damaged / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=r"no pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt from process 1 of 2"
    ):
        checkpoint.verify(damaged)
    out = helpers.cli("export", "--checkpoint", str(damaged), "--out", str(tmp_path / "export"))
    assert out.returncode == 2 and "from process 1 of 2" in out.stderr


@pytest.mark.slow
def test_a_node_local_output_dir_is_refused_at_startup(tmp_path, run_config):
    """Two nodes whose output_dir is not the same folder (node-local disks): stop before training, naming the fix."""
    config = run_config(**_defaults(train={"micro_batch_size": 1, "max_steps": 2}))
    nodes = helpers.launch_two_nodes(config, check=False, per_node=((), (f"output_dir={tmp_path / 'node1-local'}",)))
    for node in nodes:
        assert node.returncode != 0
    assert "is not shared: process 1 on" in nodes[0].stderr and "filesystem all nodes mount" in nodes[0].stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_flash_attention_checkpoint_exports_and_infers_without_flash_attention(finished_run, tmp_path):
    """The training run's attention kernel does not travel: reloading uses sdpa unless told otherwise."""
    import importlib.util

    import yaml

    assert importlib.util.find_spec("flash_attn") is None  # the point: a machine without it
    ckpt, _ = _damaged_copy(finished_run, tmp_path)
    tree = yaml.safe_load((ckpt / "config.yaml").read_text())
    tree["model"]["attn_implementation"] = "flash_attention_2"
    (ckpt / "config.yaml").write_text(yaml.safe_dump(tree))
    _rewrite_manifest(ckpt)
    out = helpers.cli("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export"))
    assert out.returncode == 0, out.stderr[-2000:]
    from llava_loop.infer import load_for_inference

    model, _, _ = load_for_inference(ckpt, device="cpu")
    assert model.config._attn_implementation == "sdpa" and next(model.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_a_second_fresh_run_never_mixes_its_checkpoints_with_the_first(tmp_path, run_config):
    """resume=none into a used output_dir is refused; resume=overwrite moves the old run aside; the new run's
    step-4 is its own (before: the save was skipped and the first run's step-4 stayed, silently)."""
    config = run_config(**_defaults(train={"max_steps": 4}))
    helpers.train_here(config)
    first = json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    refused = helpers.launch(config, "resume=none", "train.lr=1e-4", check=False)
    assert refused.returncode == 2 and "already holds checkpoints (step-000004) and resume=none" in refused.stderr
    helpers.train_here(config, "resume=overwrite", "train.lr=1e-4")
    aside = sorted((tmp_path / "run").glob("checkpoints.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "step-000004" / "COMPLETE").is_file()
    assert len(list((tmp_path / "run").glob("metrics.replaced-*.jsonl"))) == 1
    second = checkpoint.complete_checkpoints(tmp_path / "run")[-1]
    assert second.name == "step-000004" and "lr: 0.0001" in (second / "config.yaml").read_text()
    assert json.loads((second / "trainer_state.json").read_text())["scheduler"] != first["scheduler"]
    assert [m["step"] for m in helpers.metrics(tmp_path / "run")] == [1, 2, 3, 4]  # only the new run's rows
    # another folder's checkpoint into this used output_dir: refused (pruning counted the first run's as its own
    # and deleted the new run's save); into an empty one it resumes (the control)
    elsewhere = aside[0] / "step-000004"
    with pytest.raises(checkpoint.CheckpointError, match="is another folder's checkpoint, and output_dir"):
        helpers.train_here(config, f"resume={elsewhere}", "train.max_steps=5")
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run")] == ["step-000004"]
    helpers.train_here(config, f"resume={elsewhere}", "train.max_steps=5", f"output_dir={tmp_path / 'fresh'}")
    assert [m["step"] for m in helpers.metrics(tmp_path / "fresh")] == [5]


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_quarantined_and_its_step_saved_again(tmp_path, run_config):
    config = run_config(**_defaults(train={"max_steps": 4}, checkpoint={"every": 2, "keep_last": 0}))
    helpers.train_here(config)
    broken = tmp_path / "run" / "checkpoints" / "step-000004"
    (broken / "optimizer.bin").write_bytes(b"garbage")
    out = helpers.launch(config)  # resume=auto: step-4 is damaged, so it resumes from step 2
    assert "skipping damaged checkpoint, moved to .bad-step-000004" in out.stderr
    assert (tmp_path / "run" / "checkpoints" / ".bad-step-000004").is_dir()
    assert [m["step"] for m in helpers.metrics(tmp_path / "run")][-2:] == [3, 4]
    checkpoint.verify(broken)  # step 4 was saved again, whole
    rows = len(helpers.metrics(tmp_path / "run"))
    again = helpers.launch(config)  # the next resume uses it: nothing is left to train, and nothing is saved twice
    assert "resumed from" in again.stderr and "step-000004" in again.stderr
    assert len(helpers.metrics(tmp_path / "run")) == rows


@pytest.mark.slow
def test_a_checkpoint_whose_config_does_not_parse_is_set_aside_as_damaged(tmp_path, run_config):
    """config.yaml that is not YAML (its manifest entry consistent, as a tool that rewrote it would leave it):
    resume=auto sets the checkpoint aside, as other damage, and resumes from the one before; no traceback."""
    config = run_config(**_defaults(train={"max_steps": 4}, checkpoint={"every": 2, "keep_last": 0}))
    helpers.train_here(config)
    broken = tmp_path / "run" / "checkpoints" / "step-000004"
    (broken / "config.yaml").write_text("mode: [projector\n")
    manifest = json.loads((broken / "MANIFEST.json").read_text())
    checkpoint.write_manifest(broken, world_size=manifest["world_size"], per_rank=tuple(manifest["per_rank"]))
    out = helpers.launch(config)
    assert "Traceback" not in out.stderr
    assert "skipping damaged checkpoint, moved to .bad-step-000004" in out.stderr
    assert "config.yaml is unreadable" in out.stderr and "step-000002 at step 2" in out.stderr


@pytest.mark.slow
def test_resume_applies_schedule_changes_and_refuses_the_rest(tmp_path, run_config):
    from llava_loop.loop import warmup_cosine

    config = run_config(**_defaults(train={"max_steps": 4}))
    helpers.train_here(config)
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    refused = helpers.launch(config, "train.max_steps=8", "data.max_length=128", check=False)
    assert refused.returncode == 2
    listed = refused.stderr.split("cannot change on resume: ")[1].split(". Set them back")[0]
    assert listed == "data.max_length: 256 -> 128"  # train.max_steps may change: not refused
    assert (tmp_path / "run" / "config.yaml").read_text() == recorded  # a refused resume changes nothing
    resumed = helpers.launch(config, "train.max_steps=8", "train.lr=1e-3")
    assert "train.lr: 0.002 -> 0.001" in resumed.stderr and "train.max_steps: 4 -> 8" in resumed.stderr
    steps = steps_by_number(tmp_path / "run")
    assert sorted(steps) == list(range(1, 9))
    # from step 5 on, the rate follows the new peak and the new total (before: step 5 ran at the old final rate, 0)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule = warmup_cosine(probe, 8, 0.34, 0.0)
    for step in range(1, 9):
        if step >= 5:
            assert steps[step]["lr"] == pytest.approx(probe.param_groups[0]["lr"], rel=1e-12), step
        probe.step()
        schedule.step()
    assert steps[5]["lr"] > 1e-4 and "lr: 0.001" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.slow
def test_a_second_run_on_a_busy_output_dir_stops_at_once_naming_the_holder(tmp_path, run_config):
    config = run_config(**_defaults(train={"max_steps": 400}))
    first = subprocess.Popen(
        [sys.executable, str(helpers.ROOT / "train.py"), "--config", str(config)],
        cwd=helpers.ROOT,
        env=helpers.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not metrics_file.exists():
        time.sleep(0.2)
    try:
        second = helpers.launch(config, check=False)
        assert second.returncode == 2 and f"is in use by another run (pid {first.pid} on" in second.stderr
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        first.kill()  # SIGKILL: the lock stays behind, its process gone
        first.communicate()
    third = helpers.launch(config, "train.max_steps=2")
    assert "taking over the lock of a run that is gone" in third.stderr
    runs = {m["run"] for m in helpers.metrics(tmp_path / "run")}
    assert len(runs) == 2  # every row says which run wrote it
    assert not (tmp_path / "run" / ".llava_loop.lock").exists()  # released at the end


@pytest.mark.slow
def test_a_full_disk_names_the_problem_and_keeps_the_previous_checkpoint(tmp_path, run_config):
    config = run_config(**_defaults(train={"max_steps": 4}, checkpoint={"every": 2, "keep_last": 1}))
    out = helpers.launch(config, fault="disk-full:4", check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no space left on device while saving step 4 to" in out.stderr
    assert re.search(
        r"needs about [\d.]+ [kM]B, [\d.]+ [kMGT]?B free there\); the previous checkpoint \(step-000002\) is intact",
        out.stderr,
    )
    assert "Traceback" not in out.stderr and "basic_ios" not in out.stderr
    saved = checkpoint.complete_checkpoints(tmp_path / "run")
    assert [p.name for p in saved] == ["step-000002"] and not (
        tmp_path / "run" / "checkpoints" / ".tmp-step-000004"
    ).exists()
    checkpoint.verify(saved[0])


@pytest.mark.slow
def test_a_full_disk_at_a_metrics_row_stops_cleanly_and_leaves_every_file_whole(tmp_path, run_config):
    """The disk fills while step 3's metrics row is written (between checkpoints): the half row is taken back, the
    run saves step 3 and stops with an error naming the file (no traceback), and resumes from there. If the disk
    stays full, the save says how much it needs, in sensible units, and the previous checkpoint stays."""
    config = run_config(**_defaults(train={"max_steps": 5}, checkpoint={"every": 2, "keep_last": 0}))
    out = helpers.launch(config, fault="metrics-disk-full:3", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "stopped at step 3: could not write" in out.stderr and "metrics.jsonl (No space left on device" in out.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]  # all whole
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]  # step 3's row is the one lost
    saved = [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run")]
    assert saved == ["step-000002", "step-000003"]  # the steps since the last checkpoint are not lost
    resumed = helpers.launch(config)
    assert "resumed from" in resumed.stderr and "step-000003 at step 3" in resumed.stderr
    assert [r["step"] for r in helpers.metrics(tmp_path / "run")][-2:] == [4, 5]

    full = run_config("full", **_defaults(train={"max_steps": 5}, checkpoint={"every": 2, "keep_last": 0}))
    out = helpers.launch(full, fault="metrics-disk-full:3:save", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert re.search(r"saving step 3 to .* \(needs about [\d.]+ [kM]B", out.stderr), out.stderr[-2000:]
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "full")] == ["step-000002"]
    [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]


def test_sizes_in_messages_read_as_people_write_them():
    from llava_loop.errors import size_text

    assert [size_text(n) for n in (512, 4_700_000, 1_250_000_000, 0)] == ["512 B", "4.7 MB", "1.25 GB", "0 B"]


def test_export_errors_speak_of_the_checkpoint_not_of_resume(tmp_path):
    out = helpers.cli("export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "not a checkpoint directory (expected output_dir/checkpoints/step-N)" in out.stderr
    assert "resume=" not in out.stderr


@pytest.mark.slow
def test_resuming_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, run_config):
    config = run_config(**_defaults(train={"max_steps": 4}, checkpoint={"every": 2, "keep_last": 0}))
    helpers.train_here(config)
    root = tmp_path / "run" / "checkpoints"
    out = helpers.launch(config, f"resume={root / 'step-000002'}")
    assert "the newer step-000004 is moved to .rolled-back-step-000004" in out.stderr
    assert (root / ".rolled-back-step-000004" / "COMPLETE").is_file()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run")] == ["step-000002", "step-000004"]
    checkpoint.verify(root / "step-000004")  # saved again by the resumed run


def test_a_failure_on_the_main_process_is_raised_as_itself(fresh_accelerate_state):
    from accelerate import Accelerator

    from llava_loop.ranks import on_main

    def broken():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        on_main(Accelerator(cpu=True), broken)


def test_export_writes_a_model_card_the_hub_reads(tmp_path, run_config, tiny_model_dir, shapes_data):
    """README.md with front matter huggingface_hub parses: towers, library, pipeline tag, data, mode; the body
    holds the exported step's held-out metrics (not a later step's: step 2 of a 4-step run is exported), its
    config and the prompt layout."""
    from pathlib import Path

    import yaml
    from huggingface_hub import ModelCard

    sections = _defaults(mode="lora", train={"max_steps": 4}, eval={"every": 2}, checkpoint={"every": 2})
    config = run_config(**sections)
    helpers.train_here(config)
    ckpt = checkpoint.complete_checkpoints(tmp_path / "run")[0]
    out = helpers.cli("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export"))
    assert out.returncode == 0, out.stderr[-2000:]
    card = ModelCard.load(tmp_path / "export" / "README.md")
    build = json.loads((tiny_model_dir / "llava_loop_build.json").read_text())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.base_model == [Path(build["vision"]).name, Path(build["llm"]).name]
    assert card.data.datasets == [shapes_data["train"].parent.name] and "lora" in card.data.tags
    evals = {row["step"]: row for row in helpers.metrics(tmp_path / "run", "eval")}
    step2, step4 = evals[2], evals[4]
    assert f"{step2['eval_loss']:.4g}" != f"{step4['eval_loss']:.4g}"
    assert f"| eval_loss | {step2['eval_loss']:.4g} |" in card.text and f"{step4['eval_loss']:.4g} |" not in card.text
    trained = yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])
    assert trained == yaml.safe_load((ckpt / "config.yaml").read_text())
    assert "`<image>\\nQuestion`" in card.text and "for 2 optimizer steps" in card.text


@pytest.fixture(scope="module")
def wide_vocab_model_dir(tmp_path_factory):
    """The tiny model with 8,192 embedding rows tied to its LM head: the embedding (3 MiB in fp32) outweighs the
    projector's whole trained state (243 KiB) as Qwen2.5's does at real size."""
    from llava_loop.demo.tiny import TinySpec, build_tiny

    out = tmp_path_factory.mktemp("wide-vocab") / "model"
    build_tiny(out, TinySpec(embedding_rows=8192))
    return out


def _engine_bytes(checkpoint_dir) -> int:
    return sum(p.stat().st_size for p in (checkpoint_dir / "pytorch_model").rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_zero2_projector_checkpoint_holds_the_projector_not_the_frozen_tied_embedding(
    tmp_path, run_config, wide_vocab_model_dir
):
    """DeepSpeed's exclude_frozen_parameters drops frozen tensors by their first name, so under ZeRO-2 a tied LM
    head over the frozen embedding was saved whole. Now a projector-mode checkpoint is about the projector's trained
    state (fp32 weight, master copy, Adam's two moments); the run resumed from it logs the uninterrupted run's
    losses bitwise and ends at the same weights, bitwise, as export reads them. Control: DeepSpeed's own filter
    writes the embedding. (ZeRO-3 saves placeholders for every weight; test_memory checks that its checkpoints,
    like ZeRO-2's, name the trained tensors alone, in lora and full.)"""
    from llava_loop.export import load_trained
    from llava_loop.parts import count_params

    def config(name):
        return run_config(
            name,
            model=wide_vocab_model_dir,
            mode="projector",
            hooks=["plugins:StopAtStep"],
            train={"micro_batch_size": 2, "max_steps": 4},
            checkpoint={"every": 2, "keep_last": 0},
        )

    never, at_2 = {"LLAVA_TEST_STOP_AT": "-1"}, {"LLAVA_TEST_STOP_AT": "2"}
    launch = dict(processes=1)
    helpers.launch(config("control"), extra_env=never, fault="deepspeed-frozen-filter", **launch)
    helpers.launch(config("resumed"), extra_env=at_2, **launch)
    helpers.launch(config("resumed"), extra_env=never, **launch)

    control, resumed = (checkpoint.complete_checkpoints(tmp_path / name) for name in ("control", "resumed"))
    assert [p.name for p in resumed] == [p.name for p in control] == ["step-000002", "step-000004"]
    model, *_ = load_trained(resumed[-1])
    projector = 4 * 4 * count_params(model, trainable_only=True)["projector"]  # fp32: weight, master, m, v
    embedding = 4 * model.get_input_embeddings().weight.numel()
    assert embedding > 10 * projector
    for step in (0, 1):
        assert _engine_bytes(resumed[step]) < projector + 128 * 1024, resumed[step]  # the rest is pickle framing
        assert _engine_bytes(control[step]) > embedding  # the control: the frozen embedding, written again each save
        assert helpers.saved_module_names(control[step]) - helpers.saved_module_names(resumed[step]) == {
            "lm_head.weight"
        }

    assert [m["loss"] for m in helpers.metrics(tmp_path / "resumed")] == [
        m["loss"] for m in helpers.metrics(tmp_path / "control")
    ]
    exported = {n: t for n, t in model.state_dict().items()}
    reference = load_trained(control[-1])[0].state_dict()
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[n], reference[n]) for n in exported)
