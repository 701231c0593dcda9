"""What every script shares: user errors and --help, the device, safe checkpoint loading
and the nets built from one, eval mode, files written atomically, random states."""
import argparse
import contextlib
import ctypes
import io
import os
import pickle
import random
import sys
import tarfile

import numpy as np
import torch

import models

MAX_ARCHIVE_MEMBER_BYTES = 2 << 30  # the published .pth files are at most a few hundred MB


class UserError(Exception):
    """A problem with the user's input: the scripts print it as one line and exit non-zero."""


def user_error_message(error):
    """The one-line message of a UserError, also when a DataLoader worker raised it (the
    loader re-raises it with the worker's traceback in the message)."""
    message = str(error)
    if "Original Traceback" in message:
        message = message.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
    return message


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default: a switch's as on or off, an empty list as none, and
    where the default is None, the help's own words (e.g. "default: --nf") or none. The
    description and epilog keep their lines."""

    def _get_help_string(self, action):
        help = (action.help or "").replace(" (default: %(default)s)", "")  # BooleanOptionalAction adds one
        if action.default is argparse.SUPPRESS or "(default" in help:
            return help
        if action.default is None or action.default == ():
            return help + " (default: none)"
        if action.default is False or action.default is True:
            return help + " (default: %s)" % ("on" if action.default else "off")
        return help + " (default: %(default)s)"


def is_main_process():
    """Rank 0 under torchrun (which sets RANK before the process starts), or a plain run."""
    return int(os.environ.get("RANK", "0")) == 0


def warn(message):
    """A warning on stderr, printed by one process only under torchrun (rank 0)."""
    if is_main_process():
        print("warning: %s" % message, file=sys.stderr)


def resolve_device(name=None):
    """The device to run on, as a string: `name` (cpu, cuda, cuda:N) checked, or CUDA when
    available, else the CPU."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError("--device %s: expected cpu, cuda or cuda:N" % name) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device %s: CUDA is not available on this machine (use --device cpu)" % name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError("--device %s: this machine has %d CUDA devices" % (name, torch.cuda.device_count()))
    return name


def tune_for_device(device):
    """Execution settings that change no number: cuDNN picks its fastest convolutions on a
    GPU; on the CPU, freed memory is kept for reuse (keep_freed_memory)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif device.type == "cpu":
        keep_freed_memory()


def keep_freed_memory():
    """Let glibc's malloc keep freed memory in the process instead of returning it to the
    system. Each iteration frees and allocates again the same large activations; served by
    fresh mmap'd pages, every one of them costs a page fault and the kernel zeroing it
    (docs/speed.md says what this saves and costs). No effect outside glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from malloc.h
    libc.mallopt(M_MMAP_MAX, 0)        # large blocks from the heap, where freed ones are reused
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # never hand the heap's free top back to the system


# the CPU flags (/proc/cpuinfo) of bfloat16 arithmetic in hardware, most capable first
NATIVE_BFLOAT16 = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}
NO_BFLOAT16_SLOWDOWN = "9-18x"  # bf16 autocast against fp32, measured on an AVX2 CPU (docs/speed.md)


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags, as Linux lists them; none where that list cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bfloat16(flags):
    """The name of the CPU's bfloat16 units among its flags ("AMX", "AVX512-BF16"), or None."""
    return next((name for flag, name in NATIVE_BFLOAT16.items() if flag in flags), None)


def use_bfloat16(amp, device):
    """Whether the training iterations run under bfloat16 autocast for --amp `amp` on `device`,
    and the line that says why. auto: bf16 on a CPU with native bfloat16 (AMX, AVX512-BF16),
    where it trained faster and learned as well (docs/bf16.md), fp32 elsewhere (on a GPU too,
    where it is not measured). bf16 on a CPU without native bfloat16 warns: it is many times
    slower there."""
    if amp == "none":
        return False, "fp32 (--amp none)"
    if device.type != "cpu":
        return amp == "bf16", ("bf16 autocast (--amp bf16)" if amp == "bf16" else
                               "fp32 (--amp auto: bf16 only on CPUs with native bfloat16)")
    units = native_bfloat16(cpu_flags())
    if amp == "auto":
        return units is not None, ("bf16 autocast (--amp auto: this CPU has %s)" % units if units else
                                   "fp32 (--amp auto: this CPU has no native bfloat16, AMX or AVX512-BF16)")
    if units is None:
        warn("--amp bf16: this CPU has no native bfloat16 (AMX or AVX512-BF16): bf16 autocast ran %s slower than "
             "fp32 on such a CPU; --amp auto chooses for you" % NO_BFLOAT16_SLOWDOWN)
    return True, "bf16 autocast (--amp bf16%s)" % (": this CPU has %s" % units if units else "")


# ----------------------------------------------------------------------------- checkpoints

def _read_archived_pth(path):
    """The bytes of the one .pth file inside a .tar.gz, read in memory (never extracted to
    disk), refusing members that point outside the archive or are larger than a checkpoint."""
    try:
        with tarfile.open(path, "r:*") as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".pth")]
            unsafe = [m.name for m in members if os.path.isabs(m.name) or ".." in m.name.split("/")]
            if unsafe:
                raise UserError("%s: refused: archive member %s points outside the archive" % (path, unsafe[0]))
            if len(members) != 1:
                raise UserError("%s: expected an archive holding exactly one .pth file, found %d"
                                % (path, len(members)))
            if members[0].size > MAX_ARCHIVE_MEMBER_BYTES:
                raise UserError("%s: archive member %s is %d bytes, more than a ReDO checkpoint can be"
                                % (path, members[0].name, members[0].size))
            return archive.extractfile(members[0]).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError("%s: not a readable .tar.gz archive (%s)" % (path, e)) from None


def safe_torch_load(source, path, device="cpu"):
    """torch.load that unpickles only tensors, plain containers and argparse.Namespace."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(source, map_location=torch.device(device), weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError("%s: refused to load: it holds objects other than tensors and options, "
                        "which could run code (%s)" % (path, str(e).splitlines()[0])) from None
    except Exception as e:  # torch.load raises many kinds of errors on a damaged file
        raise UserError("%s: not a readable PyTorch checkpoint (%s)"
                        % (path, str(e).splitlines()[0] if str(e) else type(e).__name__)) from None


def load_checkpoint(path, device="cpu"):
    """Load a ReDO checkpoint (.pth, or the .tar.gz archive the published weights come in).

    Files saved by PyTorch 1.0 (legacy format) load as well as ours. Only tensors, plain
    containers and argparse.Namespace are unpickled (weights_only=True); everything is
    mapped to `device` (the published weights were saved from cuda:0).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError("%s: no such checkpoint file" % path)
    source = io.BytesIO(_read_archived_pth(path)) if tarfile.is_tarfile(path) else path
    state = safe_torch_load(source, path, device)
    if not isinstance(state, dict) or "options" not in state:
        raise UserError("%s: not a ReDO checkpoint (expected a dict with 'options' and nets)" % path)
    return state


def option_differences(opt, other, keys, other_name="other"):
    """'key=value (other_name: value)' for each of keys on which two sets of options differ."""
    return ["%s=%s (%s: %s)" % (key, getattr(opt, key, None), other_name, getattr(other, key, None))
            for key in keys if getattr(opt, key, None) != getattr(other, key, None)]


def check_same_options(opt, other, keys, other_name, before, after=""):
    """A UserError `before` + the differences (option_differences) + `after`, if there are any."""
    differences = option_differences(opt, other, keys, other_name)
    if differences:
        raise UserError(before + ", ".join(differences) + after)


def load_weights(net, state, name, path="checkpoint"):
    """net's weights from a checkpoint's state[name], loaded strictly: a missing net or one of
    another shape is a UserError naming the file."""
    if name not in state:
        raise UserError("%s: has no %s (it holds %s)" % (path, name, ", ".join(k for k in state if k.startswith("net"))))
    try:
        net.load_state_dict(state[name], strict=True)
    except RuntimeError as e:
        raise UserError("%s: %s does not fit the configuration in its options: %s"
                        % (path, name, str(e).splitlines()[1].strip() if "\n" in str(e) else e)) from None
    return net


def load_nets(state, names, device="cpu", path="checkpoint"):
    """Build the named nets from a checkpoint's options and load their weights strictly, in eval mode."""
    nets = models.ReDONets()
    for name in names:
        net = load_weights(models.build_net(name, state["options"], device), state, name, path)
        setattr(nets, name, net.eval())
    return nets


# ----------------------------------------------------------------------------- nets

@contextlib.contextmanager
def eval_mode(*nets):
    """Put nets in eval mode for a block, then restore each one's mode."""
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    try:
        yield
    finally:
        for net, mode in zip(nets, modes):
            net.train(mode)


# ----------------------------------------------------------------------------- writing files

def atomic_write(path, write):
    """Write a file so that it is either complete or absent/unchanged: write(f) fills a
    temporary file in the same folder, which is flushed to disk and then renamed over path.
    A failure of the file system (a full disk) is a UserError naming the file."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, ".%s.tmp%d" % (os.path.basename(path), os.getpid()))
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        cause = os_error_behind(e)
        if cause is None:
            raise
        raise UserError("%s: cannot write it (%s); the files already there are unchanged"
                        % (path, cause.strerror or cause)) from e
    finally:
        remove_if_present(tmp)


def os_error_behind(error):
    """The OSError that caused `error`, if any: torch.save reports a full disk as a
    RuntimeError raised while handling the OSError."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    return error


def remove_if_present(path):
    if os.path.exists(path):
        os.remove(path)


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def append_line(path, line):
    """Append a line to a small text file (train.dat, val.dat), atomically."""
    old = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            old = f.read()
    atomic_write(path, lambda f: f.write(old + line.encode() + b"\n"))


def read_dat(path):
    """The rows of train.dat or val.dat, [iteration, accuracy, IoU] (none if there is no file)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [[int(row[0]), float(row[1]), float(row[2])] for row in (line.split() for line in f) if row]


def count_lines(path):
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return len(f.read().splitlines())


def truncate_lines(path, n):
    """Keep the first n lines: what was written after the checkpoint we resume from goes."""
    if count_lines(path) > n:
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)[:n]
        atomic_write(path, lambda f: f.write(b"".join(lines)))


# ----------------------------------------------------------------------------- random number generators

SEED_STRIDE = 1000003  # a prime: the seeds derived from two runs' seeds do not meet


def derived_seed(seed, k):
    """The k-th seed derived from `seed` (a rollback's, a rank's loader workers'), none of them
    another run's seed or derived seed for any k a run reaches."""
    return seed + SEED_STRIDE * k


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def rng_states(cuda=torch.cuda):
    """Every generator a run draws from, in a form that loads with weights_only=True: with
    CUDA, each GPU's generator too (`cuda`: torch.cuda, or a stand-in for tests)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                        "gauss": gauss}}
    if cuda.is_available():
        states["cuda"] = cuda.get_rng_state_all()
    return states


def restore_rng_states(states, cuda=torch.cuda):
    """Set every generator as rng_states() found it. GPU states are restored on the GPUs
    that exist (a run saved on a GPU machine resumes on the CPU, or on fewer GPUs)."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and cuda.is_available():
        for index, state in enumerate(states["cuda"][:cuda.device_count()]):
            cuda.set_rng_state(state, index)
