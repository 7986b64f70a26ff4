"""convert_model.py's command line: the order of its arguments, and a Ctrl-C at each moment of a conversion, are one
line each, saying what became of the target."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from tests.helpers import files as _files
from tests.helpers import run, write_hf


def test_an_option_before_the_command_says_the_command_comes_first(capsys):
    """`convert_model.py --input-path X hg_to_pp ...` (or a misspelt option first) said "the following arguments are
    required: command", naming nothing the user wrote."""
    with pytest.raises(SystemExit) as e:
        run("--input-path", "x", "hg_to_pp", "--save-path", "y")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("convert_model.py: error: --input-path: the command "
                                                                "comes first: convert_model.py {hg_to_pp,pp_to_hg,init} "
                                                                "[options]")
    for asked in ("-h", "--help", "--hel"):  # --help as argparse takes it, abbreviated too
        with pytest.raises(SystemExit) as e:
            run(asked)
        assert e.value.code == 0 and "{hg_to_pp,pp_to_hg,init}" in capsys.readouterr().out


def test_ctrl_c_during_a_conversion_is_one_line_saying_what_became_of_the_target(tmp_path, tokenizer, capsys,
                                                                                   monkeypatch):
    """Ctrl-C was a KeyboardInterrupt traceback. Now one line (rc 130) that says what became of the target, at each
    moment it can land: while the layer files are written (the earlier output given with --overwrite stays), between
    the renames that swap the outputs (the earlier one is put back), while the earlier one is deleted (the new one is
    in place; the leftover is named)."""
    from models import outdir

    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    target = tmp_path / "pp"
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(target)) == 0
    before = _files(target)
    prefix = "convert_model.py hg_to_pp: interrupted: "

    def interrupt_at(module, name, call):  # the `call`-th call of module.name is Ctrl-C
        real, calls = getattr(module, name), []

        def patched(*args, **kw):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt
            return real(*args, **kw)
        monkeypatch.setattr(module, name, patched)

    def convert(dtype: str = "fp32") -> str:
        assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(target), "--overwrite", "--dtype",
                   dtype) == 130
        monkeypatch.undo()
        return capsys.readouterr().err.strip().splitlines()[-1]

    interrupt_at(torch, "save", 3)  # the third layer file
    assert convert() == f"{prefix}{target} was not written (nothing of it changed; its partial output is removed)"
    assert _files(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf_gqa_tied", "pp"]
    interrupt_at(outdir.os, "replace", 2)  # moved aside, then Ctrl-C before the new one is moved in
    assert convert() == (f"{prefix}{target} was not replaced (the previous output is back in place; the new one is "
                         "removed)")
    assert _files(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf_gqa_tied", "pp"]
    real_replace = outdir.os.replace

    def replace_then_ctrl_c(src, dst):  # Ctrl-C as the second rename returns: the new output is in place
        real_replace(src, dst)
        if Path(src).name.startswith(".pp.tmp-"):
            raise KeyboardInterrupt
    monkeypatch.setattr(outdir.os, "replace", replace_then_ctrl_c)
    assert convert("fp16") == f"{prefix}{target} is written (the new output is in place; the previous one is removed)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_gqa_tied", "pp"] and _files(target) != before
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(target), "--overwrite") == 0
    before = _files(target)
    interrupt_at(outdir, "_remove", 1)  # the new one in place, Ctrl-C while the previous one is deleted
    said = convert("fp16")
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".pp.old-")]
    assert len(left) == 1 and said == (f"{prefix}{target} is written (the new output is in place; what is left of the "
                                       f"previous one, {left[0]}, is removed by the next conversion into it)")
    assert torch.load(target / "layer_01-model_states.pt")["input_layernorm.weight"].dtype == torch.float16
    (tmp_path / left[0]).rename(tmp_path / f".pp.old-{socket.gethostname()}-{2**22 + 1}")  # as by a process now gone
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(target), "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_gqa_tied", "pp"]  # the leftover removed, as said
