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
import time


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback."""


def main_guard(main):
    """Runs main(); a UserError becomes 'error: ...' on stderr and exit code 1 (under torchrun, said once)."""
    try:
        main()
    except UserError as e:
        rank = int(os.environ.get("RANK", "0"))
        if rank:  # under torchrun every rank usually hits the same error: rank 0 says it, torchrun stops the rest
            time.sleep(5)  # meanwhile; one still here has an error of its own
            print(f"error (rank {rank}): {one_line(str(e))}", file=sys.stderr)
        else:
            print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(1)


def one_line(text):
    """A message with the line breaks a user's own text may carry (a file name, a value) shown as \\n."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


# ----------------------------------------------------------------------------- config


def parse_config(defaults, argv, allow_files=True, doc=None):
    """
    defaults, then each config file (plain Python assignments), then --key=value
    overrides (Python literals; anything that is not a literal is a string; an option
    whose default is a string takes the text as written). Every key must exist in
    defaults and keep its type (an int may stand for a float; a key whose default is
    None takes any literal).
    """
    if "-h" in argv or "--help" in argv:
        meanings = option_meanings(sys.argv[0])
        print((doc or "").strip() + "\n\noptions (--key=value), their defaults and meanings:")
        width = max(len(f"--{key}={value!r}") for key, value in defaults.items())
        for key, value in defaults.items():
            print(f"  {f'--{key}={value!r}':<{width}}  {meanings.get(key, '')}".rstrip())
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
            # a text option takes the text as written (--start=1984 is the text "1984")
            value = text if isinstance(defaults.get(key), str) else _literal(text)
            _apply(config, defaults, {key: value}, origin=arg)
    return config


def option_meanings(script):
    """{key: meaning} from the comments beside a script's DEFAULTS: the one place an option is described."""
    try:
        with open(script, encoding="utf-8") as f:
            source = f.read()
    except OSError:
        return {}
    block = re.search(r"^DEFAULTS = \{\n(.*?)^\}", source, flags=re.M | re.S)
    return dict(re.findall(r'^\s*"(\w+)":[^\n]*?,\s*#\s*(.+)$', block.group(1) if block else "", flags=re.M))


def script_defaults(script):
    """A script's DEFAULTS, read from its source (a literal dict): its settings without importing it."""
    with open(script, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["DEFAULTS"]:
            return ast.literal_eval(node.value)
    raise ValueError(f"{script} has no DEFAULTS")


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
    except Exception as e:  # any failure in the file is the file's problem
        line = getattr(e, "lineno", None)
        raise UserError(
            f"config file {path} does not parse{f' (line {line})' if line else ''}: {e.__class__.__name__}: {e}"
        ) from None
    return {
        k: v for k, v in namespace.items() if not k.startswith("_") and not callable(v) and not isinstance(v, type(os))
    }


def _check_key(key, defaults, origin):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(defaults))}"
        script = os.path.basename(sys.argv[0]) or "the script"
        # where the key list lives: the script's DEFAULTS, and for training every field of model.py's GPTConfig
        where = "DEFAULTS and model.py's GPTConfig" if "n_layer" in defaults else "DEFAULTS"
        raise UserError(f"unknown config key {key!r} (from {origin}){hint} (the keys are {script}'s {where})")


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
                raise UserError(
                    f"config key {key} wants {'an' if name[0] in 'aeiou' else 'a'} {name}, got {value!r} "
                    f"(from {origin})"
                )
        config[key] = value


# ----------------------------------------------------------------------------- files


class _RecordingWriter:
    """A file whose write() remembers the OSError it raised: torch.save turns that into a C++ error."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_write(path, write, by_name=False):
    """
    write(f) fills a temporary file in path's folder, which then replaces path in one
    rename: a crash at any moment leaves the old file or the new one, never half of one.
    A write that fails (a full disk, a file-size limit, a folder that went away) is a
    one-line UserError that names the path and the reason; the old file stays as it was.
    by_name: write(name) gets the temporary file's name instead, for a library that opens
    the file itself (gguf's writer).
    """
    folder = os.path.dirname(os.path.abspath(path))
    kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
    tmp, writer = None, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
        if by_name:
            os.close(fd)
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        else:
            with os.fdopen(fd, "wb") as f:
                writer = _RecordingWriter(f)
                write(writer)
                f.flush()
                os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        error = writer.error if writer is not None and writer.error is not None else e
        if isinstance(error, OSError):
            raise UserError(f"cannot write {path} ({error.strerror or error}); {kept}") from None
        raise


def check_seed(config, key="seed"):
    if not 0 <= config[key] < 2**32:
        raise UserError(f"--{key} must be a whole number from 0 to 2**32 - 1, got {config[key]}")


def check_writable_folder(folder, key):
    """folder (made if missing) can take files, or a UserError that names the option."""
    if not folder:
        raise UserError(f"--{key} is empty: pass --{key}=DIR")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--{key}={folder} is a file, not a folder: pass --{key}=DIR")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to folder {folder} ({e.strerror}); choose another with --{key}=DIR") from None


def check_output_file(path, key, extensions=None):
    """path can be written as a new file (its folder exists and is writable; its ending is in extensions)."""
    if not path:
        raise UserError(f"--{key} is empty: pass --{key}=FILE")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"--{key}={path} is a folder: pass a file name")
    if not os.path.isdir(folder):
        raise UserError(f"--{key}={path}: the folder {os.path.dirname(path)} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--{key}={path}: the folder {os.path.dirname(path) or '.'} is not writable")
    ending = os.path.splitext(path)[1].lstrip(".").lower()
    if extensions is not None and ending not in extensions:
        raise UserError(
            f"--{key}={path}: cannot write a .{ending or '(no ending)'} file; "
            f"use one of .{', .'.join(sorted(extensions))}"
        )


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


def save_figure(fig, path, dpi=80):
    """Writes a matplotlib figure atomically, in the format its file ending names, and closes it."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda f: fig.savefig(f, format=os.path.splitext(path)[1][1:].lower() or "png", dpi=dpi))
    finally:
        plt.close(fig)


def pyplot():
    """matplotlib.pyplot drawing to files (no window), or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
