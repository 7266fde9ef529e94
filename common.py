"""
Helpers that more than one script needs: the --key=value configurator, one-line errors
for user mistakes, atomic file writes, safe checkpoint loading and device selection.
"""
import ast
import difflib
import os
import re
import sys
import tempfile
import zipfile


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback."""


def main_guard(main):
    """Runs main(); a UserError becomes 'error: ...' on stderr and exit code 1."""
    try:
        main()
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank hits the same error: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------- config

def parse_config(defaults, argv, allow_files=True, doc=None):
    """
    defaults, then each config file (plain Python assignments), then --key=value
    overrides (Python literals; anything that is not a literal is a string). Every key
    must exist in defaults and keep its type (an int may stand for a float; a key whose
    default is None takes any literal).
    """
    if "-h" in argv or "--help" in argv:
        print((doc or "").strip() + "\n\noptions (--key=value) and their defaults:")
        for key, value in defaults.items():
            print(f"  --{key}={value!r}")
        sys.exit(0)
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            if not allow_files:
                raise UserError(f"unexpected argument {arg!r}: options are written --key=value")
            _apply(config, defaults, _read_config_file(arg), origin=arg)
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                # a bare --flag means True for a bool key (--greedy)
                if isinstance(defaults.get(key), bool):
                    text = "True"
                else:
                    _check_key(key, defaults, arg)
                    raise UserError(f"{arg} needs a value: write --{key}=VALUE")
            _apply(config, defaults, {key: _literal(text)}, origin=arg)
    return config


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # --device=cpu: a bare word is a string


def _read_config_file(path):
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist (the configs are in config/)")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    namespace = {}
    try:
        # a config file is the user's own Python, like nanoGPT's: exec is the point
        exec(compile(source, path, "exec"), {}, namespace)
    except Exception as e:  # noqa: BLE001 - any failure in the file is the file's problem
        line = getattr(e, "lineno", None)
        raise UserError(f"config file {path} does not parse{f' (line {line})' if line else ''}: {e.__class__.__name__}: {e}") from None
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not callable(v) and not isinstance(v, type(os))}


def _check_key(key, defaults, origin):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(defaults))}"
        raise UserError(f"unknown config key {key!r} (from {origin}){hint}")


def _apply(config, defaults, updates, origin):
    for key, value in updates.items():
        _check_key(key, defaults, origin)
        default = defaults[key]
        if default is not None:
            expected = type(default)
            ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                name = expected.__name__
                raise UserError(f"config key {key} wants {'an' if name[0] in 'aeiou' else 'a'} {name}, got {value!r} (from {origin})")
        config[key] = value


# ----------------------------------------------------------------------------- files

def atomic_write(path, write):
    """
    write(f) fills a temporary file in path's folder, which then replaces path in one
    rename: a crash at any moment leaves the old file or the new one, never half of one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checkpoint(checkpoint, path):
    import torch

    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, map_location="cpu", missing_hint="train one first with python train.py config/small.py (or pass --ckpt=PATH)"):
    """Loads a checkpoint of this project. weights_only=True: no pickled code ever runs."""
    import pickle

    import torch

    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: {missing_hint}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise UserError(f"{path} is not a checkpoint (not a torch.save archive, or truncated): pass the trained.pth that train.py wrote")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any class or function: name the one that was found
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(f"{path} holds objects other than tensors and plain values{what}, refused for safety: only load checkpoints you trust") from None
    except Exception as e:  # noqa: BLE001 - a damaged archive fails in many ways
        raise UserError(f"{path} is not a readable checkpoint (damaged or truncated: {e.__class__.__name__}); train again or restore it") from None
    if not isinstance(checkpoint, dict) or not {"model", "model_config", "tokenizer"} <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of this project (it lacks model, model_config or tokenizer)")
    return checkpoint


def load_model(path, device="cpu"):
    """(model, tokenizer, checkpoint) from a trained.pth, in eval mode on device."""
    from model import GPT, GPTConfig
    from tokenizer import from_meta

    checkpoint = load_checkpoint(path, map_location=device)
    try:
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        tokenizer = from_meta(checkpoint["tokenizer"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{path} is not a checkpoint this version of the project can load ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval(), tokenizer, checkpoint


# ----------------------------------------------------------------------------- devices

def pick_device(name):
    """'auto' -> the best device here; a named one is checked, so a missing GPU is one clear line."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name}, but this torch sees no CUDA GPU; use --device=cpu (or auto)")
    if name == "mps" and not mps:
        raise UserError("--device=mps, but Apple's Metal backend is not available here; use --device=cpu (or auto)")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return name


def pyplot():
    """matplotlib.pyplot drawing to files (no window), or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
