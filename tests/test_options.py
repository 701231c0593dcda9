"""The command line as a newcomer meets it: presets (README's table, a flag given wins, exact
resume), --help with every default, and README's Python snippet run as printed."""
import argparse
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import example_load_pretrained
import options
import utils
from conftest import ROOT, SMALL_RUN, assert_same_checkpoint, fixture_path, one_line_error, run_script

README = os.path.join(ROOT, "README.md")


def readme_presets():
    """{(preset, dataset or None): its flags} from README's table of presets."""
    table = {}
    for line in open(README):
        row = re.match(r"\| `([\w-]+)`(?: \((\w+)\))? \| `([^`]*)` \|", line)
        if row:
            table[(row.group(1), row.group(2))] = row.group(3).split()
    return table


def resolved(*flags, outf):
    return vars(options.options_for("--manualSeed", 1, "--device", "cpu", "--outf", outf, *flags))


def test_readme_lists_every_preset_and_each_dataset_of_paper():
    assert sorted({name for name, _ in readme_presets()}) == sorted(options.PRESETS)
    assert sorted(dataset for name, dataset in readme_presets() if name == "paper") == sorted(
        options.PRESETS["paper"]["flags"])


@pytest.mark.parametrize("preset, dataset", sorted(readme_presets(), key=str))
def test_each_preset_sets_exactly_its_flags_in_readme(preset, dataset, tmp_path):
    flags = readme_presets()[(preset, dataset)]
    with_preset = resolved("--dataset", dataset or "synthetic", "--preset", preset, outf=tmp_path)
    spelled_out = resolved("--dataset", dataset or "synthetic", *flags, outf=tmp_path)
    assert with_preset.pop("preset") == preset and spelled_out.pop("preset") is None
    assert with_preset == spelled_out


def test_a_flag_given_wins_over_the_preset_wherever_it_stands(tmp_path):
    before = resolved("--nf", 16, "--dataset", "synthetic", "--preset", "cpu", "--no-clean", outf=tmp_path)
    after = resolved("--dataset", "synthetic", "--preset", "cpu", "--nf", 16, "--no-clean", outf=tmp_path)
    assert before == after
    assert (after["nf"], after["clean"], after["nfM"], after["lrM"]) == (16, False, 32, 2e-4)


def test_without_a_preset_every_default_is_the_originals(tmp_path):
    opt = resolved(outf=tmp_path)
    defaults = vars(options.make_parser().parse_args([]))
    for name in ("nf", "nfD", "nfX", "nfM", "nfZ"):  # resolved from --nf, as the original
        assert opt.pop(name) == 64
        defaults.pop(name)
    for name in ("manualSeed", "device", "outf"):
        opt.pop(name), defaults.pop(name)
    assert opt == defaults and opt["preset"] is None


@pytest.mark.parametrize("flags, expected", [
    (["--preset", "gpu"], "--preset gpu: unknown preset (expected one of cpu, cpu-photos, paper)"),
    (["--dataset", "synthetic", "--preset", "paper"],
     "--preset paper is made for --dataset flowers, lfw, cub, not synthetic")])
def test_an_unknown_preset_or_one_for_another_dataset_is_one_line_before_any_work(flags, expected, tmp_path):
    result = run_script("train.py", *flags, "--outf", tmp_path / "out", cwd=tmp_path, check=False)
    assert one_line_error(result) == "error: " + expected
    assert not (tmp_path / "out").exists()


def test_a_preset_run_resumes_bit_for_bit_and_resume_auto_takes_its_command(minidata_root, tmp_path):
    """A run of --preset cpu-photos (its flips and DiffAugment draw random numbers too),
    stopped at iteration 2 and continued to 4, ends as the run never stopped; --resume auto
    with the preset's command continues it, and refuses another preset's."""
    command = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--preset", "cpu-photos",
               "--checkpointFreq", 2, "--manualSeed", 3, *SMALL_RUN]
    run_script("train.py", *command, "--nIteration", 4, "--outf", tmp_path / "whole", cwd=tmp_path)
    run_script("train.py", *command, "--nIteration", 2, "--outf", tmp_path / "stopped", cwd=tmp_path)
    run_script("train.py", "--resume", "auto", *command, "--nIteration", 4, "--outf", tmp_path / "stopped",
               cwd=tmp_path)
    whole = utils.load_checkpoint(tmp_path / "whole" / "state_00004.pth")
    resumed = utils.load_checkpoint(tmp_path / "stopped" / "state_00004.pth")
    assert_same_checkpoint(resumed, whole)
    assert resumed["options"].preset == "cpu-photos" and resumed["options"].diffAugment == ("translation", "cutout")
    other = [flag if flag != "cpu-photos" else "cpu" for flag in command]
    result = run_script("train.py", "--resume", "auto", *other, "--outf", tmp_path / "stopped", cwd=tmp_path,
                        check=False)
    assert "belongs to a run of another configuration" in one_line_error(result)


def help_entries(text):
    """{flag: its help text} of an argparse --help."""
    entries, flag = {}, None
    for line in text.splitlines():
        match = re.match(r"  (-[-\w]+)", line)
        if match:
            flag = match.group(1)
            entries[flag] = line
        elif line.startswith("   ") and flag:
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


@pytest.mark.parametrize("script, parser", [("train.py", options.make_parser),
                                            ("example_load_pretrained.py", example_load_pretrained.make_parser)])
def test_help_shows_every_default(script, parser, tmp_path):
    parser = parser()
    entries = help_entries(run_script(script, "--help", cwd=tmp_path).stdout)
    for action in parser._actions:
        if action.default is argparse.SUPPRESS:
            continue
        entry = " ".join(entries[action.option_strings[0]].split())
        if isinstance(action.default, bool):
            shown = "on" if action.default else "off"
        elif action.default is None or action.default == ():
            shown = None  # none, or what the help says it means
        else:
            shown = str(action.default)
        assert "(default: %s" % (shown or "") in entry, entry


def test_help_shows_zero_defaults_and_names_the_nets_as_readme(tmp_path):
    entries = help_entries(run_script("train.py", "--help", cwd=tmp_path).stdout)
    for flag in ("--autoRestart", "--rollback", "--earlyRestart", "--iteration", "--nTrainScore"):
        assert entries[flag].rstrip().endswith("(default: 0)"), entries[flag]
    text = " ".join(entries.values())
    assert not re.search(r"\bnet[DXMZ]\b", text)
    assert all(name in text for name in ("netDX", "netGenX", "netEncM", "netRecZ"))


def test_example_takes_batchSize_as_train_does(minidata_root, tmp_path):
    result = run_script("example_load_pretrained.py", "--statePathM", fixture_path("redo_small_netM_state.pth"),
                        "--dataroot", minidata_root / "flowers", "--batchSize", 2, "--device", "cpu", cwd=tmp_path)
    assert "out.png: 2 images" in result.stdout


def readme_python_snippet():
    return re.search(r"```python\n(.*?)```", open(README).read(), re.S).group(1)


def test_readme_snippet_runs_as_printed_and_writes_a_mask(tmp_path):
    shutil.copy(fixture_path("redo_small_nets_state.tar.gz"), tmp_path / "flowers_nets_state.tar.gz")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(
        tmp_path / "photo.jpg")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(readme_python_snippet(), "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    mask = np.asarray(Image.open(tmp_path / "photo_mask.png"))
    assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255}


def markdown_anchors(path):
    """The anchors GitHub gives the headings of a Markdown file."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", open(path).read(), re.M)}


@pytest.mark.parametrize("page", ["README.md"] + ["docs/" + name for name in sorted(os.listdir(
    os.path.join(ROOT, "docs")))])
def test_every_relative_link_of_the_manual_resolves(page):
    path = os.path.join(ROOT, page)
    for link in re.findall(r"\]\(([^)]+)\)", open(path).read()):
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        assert os.path.exists(target), link
        assert not anchor or anchor in markdown_anchors(target), link
