"""The run folder, its one owner: what a run (or sweep) folder holds and how it is written and
read. A folder is created once (never reused while it holds a run), locked while a process trains
it, written atomically (a kill mid-write leaves the previous files), and continued with --resume.

    config.json    the configuration, its `kind` and the `code` that ran it (write_config)
    metrics.jsonl  one row per epoch or round (write_rows, read_rows)
    last.pt        everything --resume needs; best*.pt the selected models (checkpoint_fields)
    sweep.json     in a sweep folder: the script and each run's arguments

`kind` (config.json, sweep.json and every checkpoint) names what wrote the folder, one of KINDS;
`kind_of` reads it, and recognises files written before the field by what they hold. Loading a
model from any checkpoint or packed file (`load_model`, `load_client_model`) lives here too."""
import contextlib
import errno
import fcntl
import io
import json
import os
import subprocess
import tempfile

import torch

import packing
import resnet
import runtime
from runtime import ConfigError, Diverged, Interrupted, OutputError

# what wrote a folder or file -> the command that continues its run (resume_command fills it)
KINDS = {'centralized': 'python main_centralized.py --resume={folder}',
         'federated': 'python main_federated.py --resume={folder}',
         'flower': 'PATH="$PWD/.venv/bin:$PATH" flwr run . --stream --federation-config '
                   '"num-supernodes={n_clients}" --run-config "resume=\'{folder}\'"',
         'sweep': None}
SCRIPTS = {'centralized': 'main_centralized.py', 'federated': 'main_federated.py',
           'flower': 'flower_app.py (flwr run .)', 'sweep': 'sweep.py'}
NOT_HYPERPARAMETERS = ('kind', 'code')  # config.json's records beside the configuration
FILES = ('last', 'best', 'best_fp', 'best_quantized')  # a checkpoint's `file` field


class RunError(Exception):
    """A run folder or file that cannot be read; the message says which, why and what to do."""


# --- what a folder or file is ------------------------------------------------------------------

def kind_of(record):
    """The kind (a key of KINDS) of a config.json, sweep.json or checkpoint's contents, or None
    for anything else (a bare state_dict). Its `kind` field where written; files from before
    the field by what they hold: a last.pt without client states is Flower's, a configuration
    with `rounds` a federated run's (a Flower run's config.json alone reads as federated)."""
    if not isinstance(record, dict):
        return None
    if record.get('kind') in KINDS:
        return record['kind']
    if 'runs' in record and 'script' in record:
        return 'sweep'
    if isinstance(record.get('config'), dict):  # a checkpoint
        if 'rows' in record and 'round' in record and record.get('clients', ()) is None:
            return 'flower'
        return kind_of(record['config'])
    if 'rounds' in record:
        return 'federated'
    if 'EPOCHS' in record:
        return 'centralized'
    return None


def file_of(checkpoint):
    """Which checkpoint (one of FILES) `checkpoint` is: its `file` field, or for files from
    before the field, 'last' for a checkpoint holding the rows, a centralized best by its
    `quantized` flag, else a federated 'best'."""
    if checkpoint.get('file') in FILES:
        return checkpoint['file']
    if 'rows' in checkpoint:
        return 'last'
    if kind_of(checkpoint) == 'centralized':
        return 'best_quantized' if checkpoint.get('quantized') else 'best_fp'
    return 'best'


def checkpoint_fields(kind, file):
    """The fields every checkpoint carries to say what it is (kind_of, file_of)."""
    return {'kind': kind, 'file': file}


def resume_command(kind, folder):
    """The command that continues the run of `kind` in `folder` (a Flower run needs as many
    SuperNodes as its config.json has clients)."""
    try:
        n_clients = read_config(folder).get('n_clients', 'N')
    except RunError:
        n_clients = 'N'
    return KINDS[kind].format(folder=folder, n_clients=n_clients)


def unit_of(kind):
    return 'epoch' if kind == 'centralized' else 'round'


def total_of(kind, cfg):
    """(hyperparameter, value): the epochs or rounds a run's configuration asks for."""
    if kind != 'centralized':
        return 'rounds', cfg['rounds']
    name = 'fp_epochs' if cfg.get('fp') else 'EPOCHS'
    return name, cfg[name]


# --- outputs ---------------------------------------------------------------------------------

def write_atomic(path, data_bytes):
    """Write bytes to `path` through a temporary file and a rename: a kill mid-write leaves the
    previous file intact."""
    write_together({os.fspath(path): data_bytes})


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def code_version():
    """{'commit', 'clean'} of the git checkout this code runs from (None where it is not one):
    clean is False when tracked files differ from the commit or untracked ones are present."""
    def git(*args):
        return subprocess.run(['git', '-C', os.path.dirname(os.path.abspath(__file__)), *args],
                              capture_output=True, text=True, timeout=30)
    try:
        head, changes = git('rev-parse', 'HEAD'), git('status', '--porcelain')
    except (OSError, subprocess.SubprocessError):
        return {'commit': None, 'clean': None}
    if head.returncode != 0 or changes.returncode != 0:
        return {'commit': None, 'clean': None}
    return {'commit': head.stdout.strip(), 'clean': not changes.stdout.strip()}


def write_config(folder, cfg, kind):
    """config.json: the run's configuration, its `kind`, and under 'code' the version of the
    code of every process that started or resumed it (code_version), the first one first."""
    path = os.path.join(folder, 'config.json')
    versions = []
    try:
        with open(path) as f:
            versions = json.load(f).get('code') or []
    except (OSError, ValueError, AttributeError):
        pass
    current = code_version()
    if not versions or versions[-1] != current:
        versions.append(current)
    write_json(path, {**{k: v for k, v in cfg.items() if k not in NOT_HYPERPARAMETERS},
                      'kind': kind, 'code': versions})


def write_json(path, obj):
    write_atomic(path, (json.dumps(obj, indent=1) + '\n').encode())


def torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_torch(path, obj):
    write_atomic(path, torch_bytes(obj))


def write_together(files):
    """Write {path: bytes} so that either all files change or none does, as far as a failure
    while writing goes (a full disk, a read-only folder): every temporary file is written
    before any is renamed into place."""
    temporaries = {}
    try:
        for path, payload in files.items():
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.fspath(path)) or '.',
                                       prefix='.tmp-')
            temporaries[path] = tmp
            os.chmod(tmp, 0o666 & ~current_umask())
            with os.fdopen(fd, 'wb') as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp in temporaries.values():
            os.unlink(tmp)
        raise
    try:
        for path, tmp in list(temporaries.items()):
            os.replace(tmp, path)
            del temporaries[path]
    finally:  # a rename that failed leaves no temporary file behind
        for tmp in temporaries.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def new_run_folder(results_dir, name, kind):
    """results_dir/name, created for a run of `kind`; a folder that already holds a run is
    never reused."""
    runtime.check_run_name(results_dir, name)
    folder = os.path.join(results_dir, name)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"{folder} is a file, not a run folder: choose another --run_name or "
                          f"--results_dir.")
    if os.path.isdir(folder) and not holds_nothing(folder):
        raise ConfigError(f"{folder} already holds a run; it is never overwritten. Choose another "
                          f"--run_name, or continue that run with: "
                          f"{continue_command(folder, kind)}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {folder} ({e.strerror}): choose a "
                          f"writable --results_dir.") from None
    return folder


def leftovers(folder):
    """What a run killed before its first output leaves: the lock, and temporary files of
    writes it never finished."""
    return [f for f in os.listdir(folder) if f == '.lock' or f.startswith('.tmp-')]


def holds_nothing(folder):
    """Whether a run folder holds no run yet (nothing, or only leftovers), so that a new run may
    take it: no folder is a dead end that neither a new run nor --resume accepts."""
    return len(leftovers(folder)) == len(os.listdir(folder))


def remove_unfinished_writes(folder):
    """Delete the temporary files of writes a kill cut short (write_atomic, write_together):
    never read, they only take room."""
    for name in leftovers(folder):
        if name.startswith('.tmp-'):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))


def describe_os_error(e, folder):
    """'the disk holding FOLDER is full' for a full disk, else the error with its file."""
    if e.errno == errno.ENOSPC:
        return f"the disk holding {folder} is full (No space left on device)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e.filename or folder} cannot be written: {e.strerror.lower()}"
    return f"{e.strerror}: {e.filename or folder}"


@contextlib.contextmanager
def locked(folder, name='.lock', doing='training'):
    """An exclusive lock on folder/name while the body runs (the operating system drops it if
    the process dies): a second process that tries to train the same run folder (or run the
    same sweep) is refused instead of writing over it."""
    path = os.path.join(folder, name)
    try:
        handle = open(path, 'a+')
    except OSError as e:
        raise ConfigError(f"cannot write into {folder} ({e.strerror}): choose a writable "
                          f"--results_dir.") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"another process is {doing} {folder} (it holds {path}): wait "
                              f"for it to end, or stop it, before running or resuming this "
                              f"{'run' if doing == 'training' else 'sweep'}.") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        except OSError as e:
            raise ConfigError(f"cannot start in {folder}: {describe_os_error(e, folder)}. Make "
                              f"room or choose another --results_dir; nothing else was "
                              f"written.") from None
        remove_unfinished_writes(folder)
        yield
    finally:
        handle.close()


def write_rows(folder, rows, lists=None):
    """metrics.jsonl (one JSON object per row) and, for {filename: key} in `lists`, a JSON list
    of that key's values, each written atomically."""
    for filename, key in (lists or {}).items():
        values = json.dumps([row[key] for row in rows])
        write_atomic(os.path.join(folder, filename), values.encode())
    write_atomic(os.path.join(folder, 'metrics.jsonl'),
                 ''.join(json.dumps(row) + '\n' for row in rows).encode())


def continue_command(folder, kind):
    """The command that continues the run in `folder`: for the kind its config.json names,
    else for `kind`."""
    try:
        found = kind_of(read_json(os.path.join(folder, 'config.json')))
    except RunError:
        found = None
    return resume_command(found if KINDS.get(found) else kind, folder)


def read_saved(folder):
    """(configuration, last.pt's contents or None, the file they came from) of the run in
    `folder`; a run stopped before its first epoch ended has only config.json."""
    path = os.path.join(folder, 'last.pt')
    config_path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path) and not os.path.isfile(config_path):
        raise ConfigError(f"--resume={folder}: no run there (neither last.pt nor config.json); "
                          f"name a folder that a run wrote.")
    source = path if os.path.isfile(path) else config_path
    try:
        if source == path:
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
            return dict(checkpoint['config']), checkpoint, source
        with open(config_path) as f:
            saved = json.load(f)
        return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}, None, source
    except PermissionError:
        raise ConfigError(f"{source} cannot be read: permission denied. Give this user read "
                          f"access to it (chmod u+r), then resume again.") from None
    except Exception as e:
        raise ConfigError(f"{source} cannot be read ({type(e).__name__}); it is damaged. Start a "
                          f"new run instead.") from None


def check_kind(folder, saved, kind):
    """A run is resumed by the engine that wrote it. Files from before the `kind` field are
    taken by either federated engine (main_federated.py refuses a Flower last.pt itself)."""
    found = kind_of(saved)
    legacy = 'kind' not in saved and {found, kind} <= {'federated', 'flower'}
    if found == kind or legacy:
        return
    if not KINDS.get(found):
        raise ConfigError(f"--resume={folder}: its files hold no run of {SCRIPTS[kind]}; name a "
                          f"folder that a run wrote.")
    raise ConfigError(f"--resume={folder}: that folder holds a run of {SCRIPTS[found]}, not of "
                      f"{SCRIPTS[kind]}; continue it with: {resume_command(found, folder)}")


def resume(folder, overrides, resumable, kind, defaults, check):
    """(configuration, last.pt's contents or None) of the run of `kind` in `folder`, checked
    before anything is written. Overrides other than `resumable` must match the saved
    configuration. Hyperparameters the run predates take their `defaults`; a saved value of
    another type than its default's, or one that `check` (the engine's configuration check)
    refuses, is an error that names the file. A run may be extended, never shortened."""
    cfg, checkpoint, source = read_saved(folder)
    check_kind(folder, cfg if checkpoint is None else checkpoint, kind)
    for key in NOT_HYPERPARAMETERS:
        cfg.pop(key, None)
    changed = [f"{k} ({cfg.get(k)!r} -> {v!r})" for k, v in overrides.items()
               if k not in resumable and cfg.get(k) != v]
    if changed:
        raise ConfigError(f"a resumed run keeps its configuration, but these overrides differ "
                          f"from it: {', '.join(changed)}. Only {', '.join(sorted(resumable))} "
                          f"may change; start a new run for the others.")
    cfg.update({k: v for k, v in overrides.items() if k in resumable})
    cfg['resume'] = folder
    wrong = [f"{k}={cfg[k]!r} is not {runtime.describe_type(v)}" for k, v in defaults.items()
             if k in cfg and runtime.coerce(v, cfg[k]) is None]
    if wrong:
        raise ConfigError(f"{source} holds values the run cannot use ({'; '.join(wrong)}): "
                          f"it was edited or damaged. Restore the run's values, or start a "
                          f"new run.")
    cfg = {**defaults, **{k: runtime.coerce(defaults[k], v) if k in defaults else v
                          for k, v in cfg.items()}}
    try:
        check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source} holds a configuration the run cannot use: {e} It was "
                          f"edited or damaged: restore the run's values, or start a new "
                          f"run.") from None
    if checkpoint is not None:
        check_not_shorter(len(checkpoint['rows']), kind, cfg, folder)
    return cfg, checkpoint


def check_not_shorter(done, kind, cfg, folder):
    """A resumed run may be extended, never shortened below what it has done."""
    name, total = total_of(kind, cfg)
    if total < done:
        raise ConfigError(f"{folder} has completed {done} {unit_of(kind)}s; --{name}={total} "
                          f"would end it before that. Give {name} of {done} or more (more "
                          f"extends the run).")


def check_data(checkpoint, fingerprint, data_root):
    """A resumed run may read its data from another data_root only if it is the same data."""
    saved = checkpoint.get('data_fingerprint') if checkpoint else None
    if saved is not None and saved != fingerprint:
        raise ConfigError(f"the data in {data_root} is not the data this run was trained on (its "
                          f"batch files differ from those recorded in last.pt): point --data_root "
                          f"at the run's data.")


def kept(folder, completed, unit):
    return (f"{folder} keeps {unit}s 1-{completed}" if completed else
            f"no {unit} had ended yet in {folder}")


def train_loop(folder, rows, total, step, save, line, kind, lists=None):
    """Extend `rows` to `total` rows, row i being step(i). After each, save(rows) writes the
    checkpoints (last.pt with them, all or none), then the logs and the stdout line follow, so
    that what a run shows is never ahead of what --resume continues from. Ctrl-C ends it with
    `Interrupted`, a non-finite loss with `Diverged`, a failed write (a full disk) with
    `OutputError`; the last completed row's outputs stay."""
    saved, clock, unit = len(rows), runtime.Clock(), unit_of(kind)
    try:
        for i in range(len(rows), total):
            try:
                row = step(i)
            except Diverged:
                raise Diverged(f"the training loss or the centers became non-finite in {unit} "
                               f"{i + 1}; the run stopped and {folder} keeps the outputs of "
                               f"{unit} {len(rows)}. Lower the learning rates or lambda_coef and "
                               f"start again.") from None
            rows.append(row)
            save(rows)
            saved = len(rows)
            write_rows(folder, rows, lists)
            clock.tick()
            print(line(row, total, clock.left(total - len(rows))), flush=True)
    except KeyboardInterrupt as e:
        raise Interrupted(f"{runtime.stop_word(e)}: {kept(folder, saved, unit)}; continue with: "
                          f"{resume_command(kind, folder)}", runtime.exit_status(e)) from None
    except OSError as e:
        raise OutputError(f"could not write the outputs of {unit} {saved + 1} "
                          f"({describe_os_error(e, folder)}); the run stopped and "
                          f"{kept(folder, saved, unit)}. Make room or fix the folder's "
                          f"permissions, then continue with: "
                          f"{resume_command(kind, folder)}") from None
    return rows




# --- reading runs ------------------------------------------------------------------------------

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except PermissionError:
        raise RunError(f"{path} cannot be read: permission denied; give this user read access "
                       f"to it (chmod u+r).") from None
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is not JSON ({e}): the file is damaged.") from None


def read_config(folder):
    """config.json of the run in `folder`, as written (with its `kind` and `code`)."""
    path = os.path.join(folder, 'config.json')
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise RunError(f"{path} does not hold a configuration (a JSON object): it was edited "
                       f"or damaged; restore it from the run's last.pt (python -c \"import "
                       f"torch; print(torch.load('last.pt')['config'])\") or rerun.")
    return cfg


def read_rows(folder):
    """metrics.jsonl's rows ([] before the first epoch or round has ended)."""
    path = os.path.join(folder, 'metrics.jsonl')
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            lines = f.readlines()
    except PermissionError:
        raise RunError(f"{path} cannot be read: permission denied; give this user read access "
                       f"to it (chmod u+r).") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise RunError(f"line {number} of {path} is not a JSON object: the file is "
                               f"damaged; resume the run to rewrite it from its last.pt.")
            rows.append(row)
    return rows


def read_run(folder):
    """(kind, config, rows) of a run folder with at least one completed epoch or round."""
    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(folder, 'config.json')):
        raise RunError(f"{folder} is not a run folder (no config.json): pass folders that "
                       f"main_centralized.py or main_federated.py wrote, e.g. Results/<run>.")
    cfg = read_config(folder)
    kind = kind_of(cfg)
    if kind not in ('centralized', 'federated', 'flower'):
        raise RunError(f"{folder} holds no run of this project (its config.json has neither a "
                       f"run's kind nor its settings).")
    rows = read_rows(folder)
    if not rows:
        raise RunError(f"{folder} has no completed epoch or round yet: plot it once its first "
                       f"one has ended.")
    return kind, cfg, rows


def status(folder):
    """'new', 'finished' or 'killed' (a folder the script has written config.json into)."""
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        return 'new'
    cfg = read_config(folder)
    try:
        _, total = total_of(kind_of(cfg), cfg)
    except (KeyError, TypeError):
        raise RunError(f"{os.path.join(folder, 'config.json')} lacks the run's length: the "
                       f"file is damaged.") from None
    return 'finished' if len(read_rows(folder)) >= total else 'killed'


# --- loading models ----------------------------------------------------------------------------

def load_model(path, device='cpu'):
    """A ready model (eval mode) from one of our checkpoints (best_fp.pt, best_quantized.pt,
    last.pt), a packed file (export.py) or any CIFAR ResNet state_dict, and the checkpoint's
    `config`, `epoch` and `metrics` ({} for a bare state_dict; a packed file's `source`).
    best_quantized.pt and packed files hold the quantized weights Q_c(x), so the model they
    give is the quantized model."""
    checkpoint = resnet.read_checkpoint(path)  # reports a missing or damaged file
    if packing.is_packed(checkpoint):
        model, info = packing.load_packed(path, device)
        source = info['source']
        return model, {**info, **source, 'metrics': {'q_test_acc': source.get('q_test_acc')}}
    if kind_of(checkpoint) in ('federated', 'flower'):
        raise resnet.CheckpointError(
            f"{path} is a federated run's checkpoint, with one model per client: load a "
            f"client's with runs.load_client_model('{path}', client), or pack them with "
            f"python export.py {path}")
    state = resnet.read_state_dict(path)  # reports a file that holds no state_dict
    info = {k: checkpoint[k] for k in ('config', 'epoch', 'metrics')
            if isinstance(checkpoint, dict) and k in checkpoint}
    arch = f"resnet{info['config']['resn']}" if 'config' in info else resnet.guess_arch(state)
    if arch is None:
        raise resnet.CheckpointError(f"checkpoint {path!r} is not a CIFAR model of this "
                                     f"project (no architecture matches its keys).")
    model = resnet.build(arch)
    resnet.load_checkpoint(model, path, arch)
    return model.to(device).eval(), info


def load_client_model(path, client, device='cpu'):
    """Client `client`'s quantized personalised model from a best.pt, ready (eval mode), and
    {'round', 'metrics', 'config', 'arch', 'bits', 'centers'}. For fedavg and fedavg_ft, whose
    clients have no model of their own, the global model."""
    if isinstance(client, bool) or not isinstance(client, int):
        raise ValueError(f"client={client!r}: give a client's index as an int, e.g. client=3.")
    checkpoint = resnet.read_checkpoint(path)
    if kind_of(checkpoint) not in ('federated', 'flower'):
        raise resnet.CheckpointError(f"{path} is not a best.pt of main_federated.py or Flower "
                                     f"(it is no federated run's checkpoint).")
    if file_of(checkpoint) == 'last':
        raise resnet.CheckpointError(
            f"{path} is a federated run's last.pt, which keeps the clients' training states: "
            f"pass its best.pt, or pack the clients' quantized models of last.pt with: python "
            f"export.py {path}")
    n_clients = checkpoint['config']['n_clients']
    if not 0 <= client < n_clients:
        raise resnet.CheckpointError(f"{path} is a run of {n_clients} clients, 0 to "
                                     f"{n_clients - 1}: there is no client {client}.")
    entries = checkpoint['clients']
    entry = entries[client] if entries else {**checkpoint['global'], 'bits': 0, 'centers': None}
    model = resnet.build(entry['arch'])
    model.load_state_dict(entry['state_dict'])
    info = {'round': checkpoint['round'], 'metrics': checkpoint['metrics'],
            'config': checkpoint['config'], 'arch': entry['arch'], 'bits': entry['bits'],
            'centers': entry['centers']}
    return model.to(device).eval(), info
