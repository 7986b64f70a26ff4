"""Device-generic code and the Gaudi / Trainium shims, on this machine's CPU.

- No `torch.cuda` outside launch/cuda_only.py: every other device use goes through DeepSpeed's accelerator.
- The Trainium path (launch.trainium -> torchrun -> train_ds.py -> launch.accelerator.TorchDeviceAccelerator
  installed with DeepSpeed's set_accelerator) with only the device and backend names changed (cpu:gloo for
  neuron:neuron) trains to the single-process reference's losses (test_train_reference's machinery).
- Both shims' --dry-run print the complete command and environment; bad combinations are one-line errors.
Nothing here ran on Gaudi or Trainium hardware (see README, "Gaudi and Trainium").
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import gaudi, trainium
from tests.helpers import free_port, pythonpath

ROOT = Path(__file__).resolve().parents[1]


def test_no_torch_cuda_outside_the_cuda_only_module():
    owner = ROOT / "launch" / "cuda_only.py"
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or path in (owner, Path(__file__).resolve()) or "site-packages" in rel.parts:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "torch.cuda" in line:
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "device use outside DeepSpeed's accelerator / launch.cuda_only:\n" + "\n".join(found)
    assert "torch.cuda" in owner.read_text()  # the grep looks at real files


@pytest.fixture
def cfg(tmp_path):
    def write(dims=(2, 1), **over):
        raw = {"model_path": "/models/pp", "save_path": "/out", "data_path": "/data.jsonl", "bf16": {"enabled": True},
               "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": list(dims)}},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}, **over}
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
        return path
    return write


def dry_run(module, argv, capsys) -> tuple[int, str, str]:
    code = module.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_gaudi_dry_run_one_node(cfg, capsys, monkeypatch):
    monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    path = cfg(dims=(4, 2))
    code, out, err = dry_run(gaudi, ["--world_size", "8", "--master_port", "29511", "--dry-run", "train_ds.py",
                                     "--config", str(path)], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("export ")] == [
        "export DS_ACCELERATOR=hpu", "export PT_HPU_LAZY_MODE=0", "export PT_ENABLE_INT64_SUPPORT=1"]
    cmd = lines[-1].split()
    assert Path(cmd[0]).name == "deepspeed"
    assert cmd[1:] == ["--num_nodes", "1", "--num_gpus", "8", "--no_local_rank", "--master_port", "29511",
                       "train_ds.py", "--config", str(path)]


@pytest.mark.parametrize("module", [gaudi, trainium])
def test_a_master_port_that_is_no_port_is_a_usage_error(module, cfg, capsys):
    """It printed a command whose ranks failed with an OverflowError at bind."""
    with pytest.raises(SystemExit) as e:
        module.main(["--master_port", "70000", "--dry-run", "train_ds.py", "--config", str(cfg(dims=(1, 1)))])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: argument --master_port: 70000 is not a port (1..65535)")


def test_gaudi_dry_run_hostfile(cfg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.deepspeed_env
    # (a field after the slots, as DeepSpeed's hostfile reader takes it, was refused)
    (tmp_path / "hosts").write_text("# two Gaudi2 servers\ngaudi-a slots=8 max_slots=8\n\ngaudi-b slots=8\n")
    path = cfg(dims=(8, 2))
    code, out, err = dry_run(gaudi, ["--hostfile", "hosts", "--dry-run", "train_ds.py", f"--config={path}"], capsys)
    assert code == 0, err
    env_file = str(tmp_path / gaudi.ENV_FILE)
    assert f"export DS_ENV_FILE={env_file}" in out
    assert f"cat > {env_file} <<'EOF'\nDS_ACCELERATOR=hpu\nPT_HPU_LAZY_MODE=0\nPT_ENABLE_INT64_SUPPORT=1\nEOF" in out
    assert out.strip().splitlines()[-1].split()[1:] == ["--hostfile", "hosts", "--master_addr", "gaudi-a",
                                                        "--no_local_rank", "--master_port", "29500", "train_ds.py",
                                                        f"--config={path}"]
    assert not (tmp_path / gaudi.ENV_FILE).exists()  # a dry run writes nothing
    # the user's .deepspeed_env (which DS_ENV_FILE replaces for DeepSpeed) is carried, before the HPU variables
    (tmp_path / ".deepspeed_env").write_text("HF_HOME=/shared/hf\nHCCL_SOCKET_IFNAME=eth0\n")
    code, out, err = dry_run(gaudi, ["--hostfile", "hosts", "--dry-run", "train_ds.py", f"--config={path}"], capsys)
    assert f"cat > {env_file} <<'EOF'\nHF_HOME=/shared/hf\nHCCL_SOCKET_IFNAME=eth0\nDS_ACCELERATOR=hpu\n" in out, out
    (tmp_path / "my_env").write_text("HF_HOME=/mine\n")  # the user's own DS_ENV_FILE name
    monkeypatch.setenv("DS_ENV_FILE", "my_env")
    code, out, err = dry_run(gaudi, ["--hostfile", "hosts", "--dry-run", "train_ds.py", f"--config={path}"], capsys)
    assert f"cat > {env_file} <<'EOF'\nHF_HOME=/mine\nDS_ACCELERATOR=hpu\n" in out, out


@pytest.mark.parametrize("argv, dims, message", [
    (["--world_size", "4"], (4, 2), "dims [4, 2] needs 8 processes, this launch starts 4 (--world_size 4)"),
    (["--world_size", "4", "--hostfile", "{hosts}"], (4, 2), "--world_size 4 does not match --hostfile"),
    (["--hostfile", "{hosts}"], (2, 2), "dims [2, 2] needs 4 processes, this launch starts 16 (16 slots in --hostfile"),
    (["--hostfile", "{bad_hosts}"], (2, 1), "expected `HOST slots=N` (N >= 1), got 'gaudi-a 8'"),
    (["--hostfile", "{latin1}"], (2, 1), "latin1_hosts: not valid UTF-8 (byte offset 21)"),  # was a traceback
    (["--world_size", "2"], (2, 1), "is not a Gaudi host"),  # no --dry-run and no habana_frameworks here
])
def test_gaudi_bad_combinations_are_one_line(argv, dims, message, cfg, capsys, tmp_path):
    (tmp_path / "hosts").write_text("gaudi-a slots=8\ngaudi-b slots=8\n")
    (tmp_path / "bad_hosts").write_text("gaudi-a 8\n")
    (tmp_path / "latin1_hosts").write_bytes(b"gaudi-a slots=8 # caf\xe9 rack\n")
    argv = [a.format(hosts=tmp_path / "hosts", bad_hosts=tmp_path / "bad_hosts", latin1=tmp_path / "latin1_hosts")
            for a in argv]
    if "is not a Gaudi host" not in message:
        argv.append("--dry-run")
    code, out, err = dry_run(gaudi, [*argv, "train_ds.py", "--config", str(cfg(dims=dims))], capsys)
    assert code == 2 and out == ""
    assert err.startswith("python -m launch.gaudi: error: ") and err.count("\n") == 1 and message in err, err


def test_gaudi_refuses_fp16_where_the_device_has_none(cfg, monkeypatch):
    """The decision for a first-generation Gaudi (habana_frameworks' _is_fp16_supported() false), given as the
    host's answer: that probe itself needs Gaudi software and did not run here."""
    path = cfg(bf16=None, fp16={"enabled": True})
    args = gaudi.parser().parse_args(["--world_size", "2", "train_ds.py", "--config", str(path)])
    with pytest.raises(gaudi.AcceleratorError, match=r"fp16 is not supported by this Gaudi .*: use bf16$"):
        gaudi.build(args, fp16=False, probe=False)
    assert gaudi.build(args, fp16=True, probe=False).env["DS_ACCELERATOR"] == "hpu"  # Gaudi2/3: allowed
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "1")
    with pytest.raises(gaudi.AcceleratorError, match="lazy mode needs htcore.mark_step"):
        gaudi.build(args, fp16=True, probe=False)


def test_gaudis_fp16_probe_runs_in_a_child_process(tmp_path, monkeypatch):
    """The shim execs DeepSpeed's launcher after it: a device the probe opened in the shim's process would stay open
    in the launcher. Habana's probe module stands in as a package of that name."""
    probe = tmp_path / "habana_frameworks" / "torch" / "utils"
    probe.mkdir(parents=True)
    for d in (probe.parents[1], probe.parent, probe):
        (d / "__init__.py").write_text("")
    (probe / "experimental.py").write_text("_is_fp16_supported = lambda: False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert gaudi.fp16_supported() is False and "habana_frameworks" not in sys.modules


def test_gaudi_dry_run_notes_unchecked_fp16(cfg, capsys):
    path = cfg(bf16=None, fp16={"enabled": True})
    code, out, err = dry_run(gaudi, ["--world_size", "2", "--dry-run", "train_ds.py", "--config", str(path)], capsys)
    assert gaudi.fp16_supported() is None  # no Gaudi software on this machine
    assert code == 0 and "# fp16: not checked here" in out, err


def test_trainium_dry_run(cfg, capsys):
    path = cfg(dims=(4, 4))
    code, out, err = dry_run(trainium, ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1", "--master_addr",
                                        "10.0.0.5", "--dry-run", "train_ds.py", "--config", str(path)], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("export ")] == ["export PIPEFT_ACCELERATOR=neuron:neuron"]
    # the shutdown timeout as an option: a torch before 2.12 ignored the variable (and refuses the option, loudly)
    assert lines[-1].split() == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes",
                                 "2", "--shutdown-timeout", "900", "--node_rank", "1", "--master_addr", "10.0.0.5",
                                 "--master_port", "29500", "train_ds.py", "--config", str(path)]


def test_trainium_passes_a_shutdown_timeout_as_torchrun_reads_it(cfg, capsys, monkeypatch):
    """TORCH_ELASTIC_SHUTDOWN_TIMEOUT as torchrun's int() takes it (" 1800", "+1800"), passed on as the number."""
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", " +1800")
    code, out, err = dry_run(trainium, ["--nproc_per_node", "2", "--dry-run", "train_ds.py", "--config", str(cfg())],
                             capsys)
    assert code == 0 and "--shutdown-timeout 1800 " in out, err


@pytest.mark.parametrize("argv, over, message", [
    (["--nproc_per_node", "4"], {}, "dims [2, 1] needs 2 processes, this launch starts 4 (--nproc_per_node 4 x --nnodes 1)"),
    (["--nproc_per_node", "1", "--nnodes", "2"], {}, "--nnodes 2 needs --master_addr"),
    (["--nproc_per_node", "2", "--node_rank", "1"], {}, "--node_rank 1 without --nnodes: this launch would be one "
                                                       "node on its own; pass --nnodes"),
    (["--nproc_per_node", "2", "--master_addr", "n0"], {}, "--master_addr n0 without --nnodes"),
    (["--nproc_per_node", "2"], {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "needs \"torch_adam\": true"),
    (["--nproc_per_node", "2"], {"optimizer": {"type": "Lamb", "params": {"lr": 1e-4}}}, "optimizer Lamb is a DeepSpeed "
                                                                                        "compiled op with no Neuron build"),
    (["--nproc_per_node", "2", "--accelerator", "neuron"], {}, "--accelerator 'neuron': expected DEVICE:BACKEND"),
    (["--nproc_per_node", "2", "--accelerator", "foo:bar"], {}, "--accelerator: torch knows no device type 'foo'"),
    (["--nproc_per_node", "2", "--accelerator", "cpu:bar"], {}, "--accelerator: torch has no process-group backend "
                                                               "'bar' here"),
    (["--nproc_per_node", "2"], {"env": ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "15m")},
     "TORCH_ELASTIC_SHUTDOWN_TIMEOUT='15m': must be whole seconds (torchrun's --shutdown-timeout, 900 when unset)"),
])
@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "launch"])
def test_trainium_bad_combinations_are_one_line(argv, over, message, dry, cfg, capsys, monkeypatch):
    over = dict(over)  # (the parameter's dict is every run's)
    if env := over.pop("env", None):
        monkeypatch.setenv(*env)
    monkeypatch.setattr(trainium.Launch, "execute", lambda self: pytest.fail(f"launched: {self.cmd}"))
    code, out, err = dry_run(trainium, [*argv, *["--dry-run"] * dry, "train_ds.py", "--config", str(cfg(**over))],
                             capsys)
    assert code == 2 and out == ""
    assert err.startswith("python -m launch.trainium: error: ") and err.count("\n") == 1 and message in err, err
    assert "PIPEFT_ACCELERATOR" not in err  # the option the user typed is what is named


@pytest.mark.parametrize("shim, first", [(gaudi, ["--world_size", "2"]), (trainium, ["--nproc_per_node", "2"])],
                         ids=["gaudi", "trainium"])
def test_the_shims_check_the_config_the_script_takes(shim, first, cfg, tmp_path, capsys):
    """The shims checked the first --config where train_ds.py takes the last, refused the --conf it takes, and passed
    a launcher option put after the script on to it (torchrun then died with a screen of traceback)."""
    good, missing = cfg(), tmp_path / "missing.json"
    for args, ok in (([good, missing], False), ([missing, good], True)):
        argv = [*first, "--dry-run", "train_ds.py", *(x for path in args for x in ("--config", str(path)))]
        code, out, err = dry_run(shim, argv, capsys)
        assert (code == 0) == ok and (ok or f"{missing}: cannot read" in err), err
    code, out, err = dry_run(shim, [*first, "--dry-run", "train_ds.py", "--conf", str(good)], capsys)
    assert code == 0, err
    code, out, err = dry_run(shim, [*first, "--dry-run", "train_ds.py", "--config", str(good), *first], capsys)
    assert code == 2 and err.endswith(f"error: the training script's arguments {' '.join(first)} are not its own "
                                      "(train_ds.py takes --config CFG.json; this launcher's options go before the "
                                      "script)\n"), err


@pytest.mark.parametrize("optimizer, said", [
    ({"type": "1bit_adam", "params": {"lr": 1e-4}}, "optimizer.type '1bit_adam': DeepSpeed's 1-bit optimizers are not "
                                                   "supported here"),
    ({}, "optimizer.type must be a string, got null"), ("AdamW", "'optimizer' must be an object"),
    ({"type": "MuAdamW", "params": {"lr": 1e-4}}, "optimizer.type 'MuAdamW' needs the mup package"),
], ids=["1-bit", "empty", "a string", "what this host lacks"])
def test_trainium_checks_the_optimizer_as_the_trainer_does_where_it_launches(optimizer, said, cfg, capsys, monkeypatch):
    """The shim's own optimizer rule passed what the trainer refuses ('1bit_adam', an empty or a string section): the
    ranks refused it, after torchrun started. A --dry-run (the command for another host) checks the same, but not
    what this host has installed (mup)."""
    if "mup" in said and importlib.util.find_spec("mup") is not None:
        pytest.skip("mup is installed here")
    monkeypatch.setattr(trainium.Launch, "execute", lambda self: pytest.fail(f"launched: {self.cmd}"))
    path = cfg(optimizer=optimizer)
    code, out, err = dry_run(trainium, ["--nproc_per_node", "2", "train_ds.py", "--config", str(path)], capsys)
    assert (code, out) == (2, "") and err.startswith(f"python -m launch.trainium: error: {path}: {said}"), err
    code, out, err = dry_run(trainium, ["--nproc_per_node", "2", "--dry-run", "train_ds.py", "--config", str(path)],
                             capsys)
    if "mup" in said:
        assert code == 0 and "train_ds.py --config" in out, err
    else:
        assert (code, out) == (2, "") and err.startswith(f"python -m launch.trainium: error: {path}: {said}"), err


@pytest.mark.parametrize("spec, message", [
    ("xpu:gloo", "--accelerator: no 'xpu' device here (torch.xpu.is_available() is false)"),
    ("cuda:gloo", "--accelerator: no 'cuda' device here (torch.cuda.is_available() is false)"),
    ("hpu:gloo", "--accelerator: no 'hpu' device here (torch has no torch.hpu module and its current accelerator is "
                 "none; is the package that registers the device installed?)"),
    ("meta:gloo", "--accelerator: 'meta' is not a training device (its tensors hold no data)"),
])
def test_trainium_refuses_a_device_this_machine_lacks(spec, message, cfg, capsys, monkeypatch):
    """torch knows these device types by name; this machine has none of them (meta is no training device at all).
    --dry-run prints the command for a host that has the device, with a note; meta is refused there too."""
    monkeypatch.setattr(trainium.Launch, "execute", lambda self: pytest.fail(f"launched: {self.cmd}"))
    argv = ["--nproc_per_node", "2", "--accelerator", spec, "train_ds.py", "--config", str(cfg())]
    code, out, err = dry_run(trainium, argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("python -m launch.trainium: error: ") and err.count("\n") == 1 and message in err, err
    code, out, err = dry_run(trainium, ["--dry-run", *argv], capsys)
    if spec.startswith("meta"):
        assert code == 2 and out == "" and message in err, err
    else:
        device = spec.split(":")[0]
        assert code == 0 and err == "", err
        assert f"# no {device!r} device here: the command is for a host with one" in out.splitlines()
        assert f"export PIPEFT_ACCELERATOR={spec}" in out.splitlines()


def test_trainium_refuses_a_real_launch_without_torchneuron(cfg, capsys):
    code, out, err = dry_run(trainium, ["--nproc_per_node", "2", "train_ds.py", "--config", str(cfg())], capsys)
    assert code == 2 and "torch_neuronx (TorchNeuron) is not installed" in err


def test_activation_checkpointing_restores_a_device_rng_state_into_the_device(monkeypatch):
    """A device module with get_rng_state / set_rng_state but no default_generators (TorchNeuron's may be one): the
    state DeepSpeed's checkpointing saved was restored into the host's generator (a size error; had the sizes matched,
    the recompute's dropout would have drawn other numbers than the forward's)."""
    from types import SimpleNamespace

    from deepspeed.runtime.activation_checkpointing import checkpointing

    from launch.accelerator import TorchDeviceAccelerator

    restored = []
    acc = TorchDeviceAccelerator("cpu", "gloo")
    acc._mod = SimpleNamespace(get_rng_state=lambda: torch.arange(16, dtype=torch.uint8), set_rng_state=restored.append)
    monkeypatch.setattr(checkpointing, "get_accelerator", lambda: acc)
    checkpointing._set_cuda_rng_state(acc.get_rng_state())
    assert len(restored) == 1 and torch.equal(restored[0], torch.arange(16, dtype=torch.uint8))


@pytest.mark.distributed
def test_trainium_path_on_cpu_matches_reference(tmp_path, tokenizer):
    """launch.trainium --accelerator cpu:gloo: torchrun, PIPEFT_ACCELERATOR, TorchDeviceAccelerator in every rank;
    the 2-stage losses and exported weights match the single-process transformers reference."""
    from tests.test_train_reference import check_against_reference

    def launch(config: Path, procs: int) -> str:
        env = {**os.environ, "PYTHONPATH": pythonpath(ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("DS_ACCELERATOR", None)  # DeepSpeed's own CPU accelerator is not what runs
        r = subprocess.run([sys.executable, "-m", "launch.trainium", "--accelerator", "cpu:gloo", "--nproc_per_node",
                            str(procs), "--master_port", str(free_port()), "train_ds.py", "--config", str(config)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:]
        assert "export PIPEFT_ACCELERATOR" not in out  # launched, not a dry run
        assert re.search(r"device: cpu via TorchDeviceAccelerator \(process group gloo; 1 thread per process\); host "
                         "memory", out), out[-3000:]
        return out

    check_against_reference(tmp_path, tokenizer, 2, [2, 1], "llama", "mha_bias_untied", 1.0, False, False, "adamw",
                            launch=launch)


@pytest.mark.parametrize("env, message", [
    ({"DS_ACCELERATOR": "hpu"}, "train_ds.py: error: DS_ACCELERATOR=hpu: DeepSpeed's HPU accelerator needs "
     "habana_frameworks, which is not installed here (unset DS_ACCELERATOR to let DeepSpeed detect this machine's "
     "device)"),
    ({"DS_ACCELERATOR": "cpu", "PIPEFT_ACCELERATOR": "hpu:hccl"}, "train_ds.py: error: PIPEFT_ACCELERATOR: torch has "
     "no process-group backend 'hccl' here (is the package that registers it installed?)"),
    ({"DS_ACCELERATOR": "cpu", "PIPEFT_ACCELERATOR": "hpu:gloo"}, "train_ds.py: error: PIPEFT_ACCELERATOR: no 'hpu' "
     "device here (torch has no torch.hpu module and its current accelerator is none; is the package that registers "
     "the device installed?)"),
    ({"DS_ACCELERATOR": "cpu", "PIPEFT_ACCELERATOR": "xpu:gloo"}, "train_ds.py: error: PIPEFT_ACCELERATOR: no 'xpu' "
     "device here (torch.xpu.is_available() is false)"),
    ({"DS_ACCELERATOR": "cpu", "PIPEFT_ACCELERATOR": "meta:gloo"}, "train_ds.py: error: PIPEFT_ACCELERATOR: 'meta' is "
     "not a training device (its tensors hold no data); name the device to train on, e.g. neuron:neuron or cpu:gloo"),
    ({"DS_ACCELERATOR": "xpu"}, "train_ds.py: error: DS_ACCELERATOR=xpu: DeepSpeed's XPU accelerator needs torch with "
     "XPU support, and torch.xpu.is_available() is false here (unset DS_ACCELERATOR to let DeepSpeed detect this "
     "machine's device)"),
], ids=["DS_ACCELERATOR", "PIPEFT_ACCELERATOR backend", "PIPEFT_ACCELERATOR hpu", "PIPEFT_ACCELERATOR xpu",
        "PIPEFT_ACCELERATOR meta", "DS_ACCELERATOR xpu"])
def test_an_accelerator_this_machine_lacks_is_one_line(cfg, env, message):
    """DeepSpeed builds DS_ACCELERATOR's accelerator when it is imported (a traceback there); a backend torch lacks
    failed as an AssertionError once the process group started; a device torch knows by name but this machine lacks
    failed at its first use (set_device, the model's .to())."""
    proc = subprocess.run([sys.executable, "train_ds.py", "--config", str(cfg(dims=(1, 1)))], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, **env})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == message, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


_UNSET = "(unset DS_ACCELERATOR to let DeepSpeed detect this machine's device)"


@pytest.mark.parametrize("value, problem", [
    ("cpu", None), ("cuda", None),  # DeepSpeed's CUDA accelerator builds without a GPU (its first use fails)
    *[(name, f"DS_ACCELERATOR={name}: DeepSpeed's {name.upper()} accelerator needs {package}, which is not installed "
       f"here {_UNSET}") for name, package in [("hpu", "habana_frameworks"), ("npu", "torch_npu"),
                                              ("mlu", "torch_mlu"), ("sdaa", "torch_sdaa"), ("supa", "torch_supa"),
                                              ("klxpu", "torch_xmlir")]],
    ("xpu", f"DS_ACCELERATOR=xpu: DeepSpeed's XPU accelerator needs torch with XPU support, and "
     f"torch.xpu.is_available() is false here {_UNSET}"),
    ("mps", f"DS_ACCELERATOR=mps: DeepSpeed's MPS accelerator needs torch's MPS backend (Apple silicon), which torch "
     f"here does not have {_UNSET}"),
    *[(name, f"DS_ACCELERATOR={name!r}: not an accelerator DeepSpeed knows; it accepts cuda, cpu, xpu, npu, mps, hpu, "
       f"mlu, sdaa, supa, klxpu {_UNSET}") for name in ("gpu", "bogus", "", "HPU")],
])
def test_ds_accelerator_problem_covers_every_value_deepspeed_fails_on_import(monkeypatch, value, problem):
    """Each DS_ACCELERATOR that DeepSpeed's get_accelerator (run by its import) refuses with a ValueError here: a
    vendor package or torch device support this machine lacks, or a value not in its SUPPORTED_ACCELERATOR_LIST."""
    from launch import ds_accelerator_problem

    monkeypatch.setenv("DS_ACCELERATOR", value)
    assert ds_accelerator_problem() == problem
    monkeypatch.delenv("DS_ACCELERATOR")
    assert ds_accelerator_problem() is None


def test_ds_accelerators_are_deepspeeds_supported_list():
    """DS_ACCELERATORS follows the installed DeepSpeed's SUPPORTED_ACCELERATOR_LIST (read, not imported: DeepSpeed's
    import builds the accelerator), so a DeepSpeed that adds one fails here rather than refusing a valid value."""
    import ast
    import importlib.util

    from launch import DS_ACCELERATORS

    [where] = importlib.util.find_spec("deepspeed").submodule_search_locations
    tree = ast.parse((Path(where) / "accelerator" / "real_accelerator.py").read_text())
    [listed] = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["SUPPORTED_ACCELERATOR_LIST"]]
    assert tuple(listed) == DS_ACCELERATORS


@pytest.mark.parametrize("argv", [["demo.py", "--model-path", "x", "--prompt", "hi"],
                                  ["convert_model.py", "hg_to_pp", "--input-path", "x", "--save-path", "y"],
                                  ["-m", "training.plan", "--help"], ["-m", "data.inspect", "--config", "x", "--stats"],
                                  ["-m", "launch.trainium", "--accelerator", "cpu:gloo", "train_ds.py", "--config",
                                   "x"],
                                  ["-m", "launch.trainium", "--dry-run", "train_ds.py", "--config", "x"]],
                         ids=["demo", "convert", "plan", "inspect", "trainium", "trainium dry-run"])
def test_every_entry_point_says_in_one_line_when_ds_accelerator_cannot_work(argv):
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "hpu"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        ": error: DS_ACCELERATOR=hpu: DeepSpeed's HPU accelerator needs habana_frameworks, which is not installed "
        "here (unset DS_ACCELERATOR to let DeepSpeed detect this machine's device)"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# the process of a node's LOCAL_RANK 1 under srun --gpus-per-task=1, simulated on CPU: DeepSpeed's accelerator (its
# CPU one underneath) says its device is cuda and that this process sees 1 of them, so cuda:1 does not exist
_ONE_VISIBLE_GPU = """
import sys
import deepspeed.accelerator as dsa
import deepspeed.accelerator.real_accelerator as ra
real = ra.get_accelerator()
class OneVisibleGpu:
    def __getattr__(self, name): return getattr(real, name)
    def device_name(self, index=None): return "cuda"
    def device_count(self): return 1
fake = OneVisibleGpu()
dsa.get_accelerator = ra.get_accelerator = lambda: fake
import train_ds
sys.exit(train_ds.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("case", ["own device", "config"])
def test_an_error_only_some_ranks_raise_is_printed_by_them(case, tmp_path, ops_model):
    """A process other than its node's LOCAL_RANK 0 prints the errors that name it ("rank N: ...": found by this
    rank about itself, e.g. its device under srun --gpus-per-task) and leaves the errors every rank raises (a config
    error) to LOCAL_RANK 0, so that a node shows one copy of those."""
    from tests.helpers import errors_of, ops_config

    config = ops_config(tmp_path, ops_model) if case == "own device" else tmp_path / "missing.json"
    env = {**os.environ, "PYTHONPATH": pythonpath(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RANK": "1",
           "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.pop("PIPEFT_ACCELERATOR", None)
    proc = subprocess.run([sys.executable, "-c", _ONE_VISIBLE_GPU, "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    if case == "own device":
        assert errors_of(proc.stderr) == [
            "train_ds.py: error: rank 1: LOCAL_RANK 1, but this process sees 1 cuda device(s) (cuda:1 does not exist): "
            "every process of a node must see all of the node's devices (under SLURM: --gpus-per-node, without "
            "--gpus-per-task or --gpu-bind)"], proc.stderr[-3000:]
    else:
        assert errors_of(proc.stderr) == [], proc.stderr[-3000:]  # LOCAL_RANK 0 says it


@pytest.mark.parametrize("value", ["hpu", "xpu"])
def test_gaudi_ignores_an_unusable_ds_accelerator_of_its_caller(cfg, value):
    """DS_ACCELERATOR=hpu (as Gaudi's docs have users export it) on a host without habana_frameworks, or any other
    value DeepSpeed's import would fail on here (xpu without XPU support): the shim's own checks do not use the
    device and its launch sets DS_ACCELERATOR=hpu itself, so --dry-run prints the command as without the variable,
    and a real launch is the one-line "not a Gaudi host" refusal."""
    env = {**os.environ, "PYTHONPATH": pythonpath(ROOT), "DS_ACCELERATOR": value}
    env.pop("PT_HPU_LAZY_MODE", None)
    argv = [sys.executable, "-m", "launch.gaudi", "--world_size", "1", "train_ds.py", "--config", str(cfg(dims=(1, 1)))]
    dry = subprocess.run([*argv[:5], "--dry-run", *argv[5:]], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert dry.returncode == 0 and "Traceback" not in dry.stderr, dry.stderr[-3000:]
    lines = dry.stdout.strip().splitlines()
    assert "export DS_ACCELERATOR=hpu" in lines and lines[-1].endswith("train_ds.py --config " + argv[-1]), dry.stdout
    assert all(ln.startswith(("# ", "export ")) for ln in lines[:-1]), dry.stdout  # runnable in bash: no log lines
    if value != "hpu":
        return  # the real launch below does not depend on the caller's value either: checked once
    real = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert real.returncode == 2 and real.stdout == "" and "Traceback" not in real.stderr, real.stderr[-3000:]
    assert real.stderr.strip().splitlines() == [
        "python -m launch.gaudi: error: habana_frameworks is not installed: this is not a Gaudi host with Intel Gaudi software "
        "(--dry-run prints the command anyway)"], real.stderr[-3000:]


def test_trainium_refuses_a_busy_master_port_in_one_line(cfg, capsys, monkeypatch):
    """torchrun's agent serves the rendezvous store on node 0: a port another process holds was its 45-line
    traceback. A dry run, and another node than node 0, do not check it (the port is node 0's)."""
    import socket

    monkeypatch.setattr(trainium.Launch, "execute", lambda self: pytest.fail(f"launched: {self.cmd}"))
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = str(held.getsockname()[1])
        argv = ["--nproc_per_node", "2", "--accelerator", "cpu:gloo", "--master_port", port, "train_ds.py", "--config",
                str(cfg(optimizer={"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}))]
        code, out, err = dry_run(trainium, argv, capsys)
        assert code == 2 and err == (f"python -m launch.trainium: error: --master_port {port} is already in use on "
                                     "this machine (another run?): pass a free port\n"), err
        assert dry_run(trainium, ["--dry-run", *argv], capsys)[0] == 0


@pytest.mark.parametrize("command", [["train_ds.py"], ["convert_model.py"], ["demo.py"], ["@pipeft-train"]],
                         ids=lambda c: c[-1])
def test_a_ctrl_c_while_a_command_imports_its_libraries_is_one_line(command):
    """The first seconds of every command import torch, DeepSpeed and transformers: a Ctrl-C there was a traceback
    through the import machinery (30 lines). Now one line, and the exit of a SIGINT (130 in a shell)."""
    import signal
    import time

    if command[0].startswith("@"):  # the entry point's script, as pip writes it (pipeft._main imports train_ds)
        command = [sys.executable, "-c", "import sys; from pipeft import train; sys.exit(train())"]
    else:
        command = [sys.executable, *command]
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
           "DS_ACCELERATOR": "cpu", "PYTHONPATH": pythonpath(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # (the imports take seconds more)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    prog = "pipeft-train" if command[1] == "-c" else command[-1]
    assert (err, out) == (f"{prog}: interrupted while starting: nothing was done\n", "")
    assert proc.returncode == -signal.SIGINT  # (as Python ends at an uncaught KeyboardInterrupt)
