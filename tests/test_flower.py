"""flower_app.py: its configuration is main_federated.py's, its simulation gives
main_federated.py's rows bit for bit, it aggregates in partition order, floors integer buffers,
resumes a killed run exactly; and (QUPED_SLOW=1, `-k deploy`) real SuperNode processes with TLS
and node authentication on loopback.

Needs requirements-flower.txt; skipped, with the reason, where Flower is not installed.
"""
import ast
import collections
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest
import torch

import federated
import main_federated as mf
import runtime
from conftest import ROOT, assert_same_best, kill_after_round

flwr = pytest.importorskip('flwr', reason='Flower is not installed: pip install -r '
                                          'requirements-flower.txt')
import flower_app  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict  # noqa: E402

THREADS = 1  # each simulated client runs on one CPU (one torch thread), and so does the
# in-process run it is compared with: the reference's sums follow the thread count


def test_the_apps_run_config_is_exactly_main_federated_hyperparameters():
    defaults = flower_app.pyproject_defaults()
    assert defaults == mf.DEFAULTS
    assert {k: type(v) for k, v in defaults.items()} == {k: type(v) for k, v in
                                                         mf.DEFAULTS.items()}


@pytest.mark.parametrize('name, value', [('rounds', 'ten'), ('lambda_p', 1.5),
                                         ('algorithm', 'fedprox'), ('client_bits', '(1,9)'),
                                         ('epochs', 3)])
def test_a_bad_run_config_value_gets_the_scripts_message(name, value):
    with pytest.raises(runtime.ConfigError) as script:
        federated.make_config(mf.DEFAULTS, [f'--{name}={flower_app.as_text(value)}'])
    with pytest.raises(runtime.ConfigError) as app:
        flower_app.config_from_run_config({name: value})
    assert str(app.value) == str(script.value)


def reply(state, weight):
    class Reply:
        content = RecordDict({'global': ArrayRecord(state),
                              'reply': ConfigRecord({'weight': weight})})
    return Reply()


def test_aggregation_in_any_reply_order_equals_aggregate_in_partition_order():
    generator = torch.Generator().manual_seed(0)
    states = [{'w': torch.randn(1000, generator=generator),
               'n': torch.tensor(c + 3, dtype=torch.long)} for c in range(4)]
    weights = [17, 250, 3, 1000]
    want = federated.aggregate(states, weights)
    for order in itertools.permutations(range(4)):
        replies = {c: reply(states[c], weights[c]) for c in order}
        got = flower_app.aggregate_replies(replies)
        assert torch.equal(got['w'], want['w']) and torch.equal(got['n'], want['n'])
    arrival = federated.aggregate([states[c] for c in (3, 1, 0, 2)], [weights[c] for c in
                                                                      (3, 1, 0, 2)])
    assert not torch.equal(arrival['w'], want['w'])  # the order does move the floats


def test_integer_buffers_are_floored_as_in_process():
    counts = [torch.tensor(3), torch.tensor(4)]
    replies = {c: reply({'n': counts[c]}, w) for c, w in ((0, 1), (1, 2))}
    got = flower_app.aggregate_replies(replies)['n']
    assert got.dtype == torch.int64 and got.item() == (3 + 2 * 4) // 3 == 3  # mean 3.67


# --- simulation --------------------------------------------------------------------------------

def run_config(cifar_root, folder, name, **extra):
    return {'data_root': str(cifar_root), 'results_dir': str(folder), 'run_name': name,
            'n_clients': 3, 'rounds': 2, 'classes_per_client': 4, 'BATCH_SIZE': 20,
            'client_archs': "('resnet8',)", 'global_arch': 'resnet8', 'client_bits': '(1, 2)',
            'freeze_round': 2, **extra}


def simulate(config):
    flower_app.simulate(config, config['n_clients'])  # one CPU and one thread per client


def in_process(config):
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        args = [f'--{k}={flower_app.as_text(v)}' for k, v in config.items()]
        return mf.main(args)
    finally:
        torch.set_num_threads(before)


def rows(folder):
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith('seconds')}
                for line in f]


@pytest.mark.parametrize('algorithm', ['quped', 'fedavg', 'local', 'fedavg_qft'])
def test_a_flower_simulation_gives_main_federated_rows_bit_for_bit(cifar_root, tmp_path,
                                                                   algorithm):
    config = run_config(cifar_root, tmp_path / 'flower', 'run', algorithm=algorithm,
                        ft_epochs=1)
    simulate(config)
    folder = tmp_path / 'flower' / 'run'
    expected = in_process({**config, 'results_dir': str(tmp_path / 'script')})
    assert rows(folder) == rows(expected)
    configs = []
    for name in ('config.json', 'partition.json'):
        with open(folder / name) as f, open(os.path.join(expected, name)) as g:
            configs.append((json.load(f), json.load(g)))
    (flower_cfg, script_cfg), (flower_parts, script_parts) = configs
    assert (flower_cfg['kind'], script_cfg['kind']) == ('flower', 'federated')
    assert {torch.load(folder / f, weights_only=True)['kind'] for f in ('best.pt', 'last.pt')} == {
        'flower'}
    assert ({**flower_cfg, 'results_dir': '', 'kind': ''} ==
            {**script_cfg, 'results_dir': '', 'kind': ''})
    assert flower_parts == script_parts
    assert_same_best(folder, expected)


def test_a_client_keeps_its_newest_state_and_reads_older_ones_from_their_files(tmp_path):
    """A client's process keeps the state of its last training; asking for an older one (the
    state best.pt wants) reads that one's file and leaves the kept one, which the next message
    gets without reading a file; files older than `keep` go."""
    cfg = {**flower_app.pyproject_defaults(), 'client_archs': ('cifarnet',)}
    context = Context(run_id=0, node_id=0, node_config={'partition-id': 1}, state=RecordDict(),
                      run_config={})
    dev, folder = torch.device('cpu'), str(tmp_path)
    old = flower_app.load_state(cfg, context, folder, dev, 0)
    flower_app.keep_state(context, folder, old, 3, keep=0)
    with torch.no_grad():
        next(old['model'].parameters()).add_(1.0)
    flower_app.keep_state(context, folder, old, 5, keep=3)
    flower_app.STATES.pop((folder, 1))
    newest = flower_app.load_state(cfg, context, folder, dev, 5)  # from its file
    earlier = flower_app.load_state(cfg, context, folder, dev, 3)
    assert earlier is not newest
    assert not torch.equal(next(earlier['model'].parameters()), next(newest['model'].parameters()))
    assert flower_app.load_state(cfg, context, folder, dev, 5) is newest
    flower_app.keep_state(context, folder, newest, 6, keep=5)
    assert sorted(os.listdir(tmp_path / 'clients')) == ['client_1.after_5.pt',
                                                        'client_1.after_6.pt']
    with pytest.raises(runtime.ConfigError, match='no state after round 4'):
        flower_app.load_state(cfg, context, folder, dev, 4)


def count_messages(monkeypatch):
    """(kind, round trained, round evaluated, what is wanted) of every message the server
    builds, in a list."""
    sent, real = [], flower_app.message

    def counted(node, kind, rnd, settings, global_record=None):
        sent.append((kind, settings.get('round'), settings.get('evaluate'), settings.get('want')))
        return real(node, kind, rnd, settings, global_record)
    monkeypatch.setattr(flower_app, 'message', counted)
    return sent


def expected_messages(metrics, first, last, n_clients):
    """The messages of rounds first..last (0-based) of a run with rows `metrics`, one per client
    per round: the clients' check; round `first`'s training alone; then per round r, round
    r + 1's training with r's evaluation to the clients sampled for r + 1 and r's evaluation
    alone to the others (all of them after the last round); a request for every client's
    quantized model in the rounds that improve best.pt."""
    sampled = [row['sampled'] for row in metrics]
    best, improved = -1.0, []
    for row in metrics:
        improved.append(row['q_val_acc_weighted'] > best)
        best = max(best, row['q_val_acc_weighted'])
    counts = collections.Counter({(MessageType.QUERY, 0, None, None): n_clients,
                                  (MessageType.TRAIN, first, None, None): len(sampled[first])})
    for r in range(first, last + 1):
        following = len(sampled[r + 1]) if r + 1 < len(metrics) else 0
        counts[(MessageType.TRAIN, r + 1, r, None)] += following
        counts[(MessageType.EVALUATE, None, r, None)] += n_clients - following
        counts[(MessageType.QUERY, r, None, 'best')] += n_clients * improved[r]
    return +counts


def test_a_killed_and_resumed_flower_run_equals_an_uninterrupted_one_and_its_messages_count(
        cifar_root, tmp_path, monkeypatch):
    """Killed after round 1 and resumed, the run's rows equal an uninterrupted in-process run's,
    with half the clients sampled per round. Its messages, counted in both parts, are one per
    client per round (expected_messages), so every client is evaluated every round."""
    sent = count_messages(monkeypatch)
    config = run_config(cifar_root, tmp_path, 'killed', rounds=3, client_fraction=0.5)
    with monkeypatch.context() as patch:
        kill_after_round(patch, 1)  # raised in the server's thread, which the simulation ends
        simulate(config)
    folder, before = tmp_path / 'killed', list(sent)
    assert len(torch.load(folder / 'last.pt', weights_only=True)['rows']) == 1
    del sent[:]
    simulate({**config, 'resume': str(folder), 'run_name': ''})
    expected = in_process({**config, 'results_dir': str(tmp_path / 'script')})
    metrics = rows(folder)
    assert metrics == rows(expected) and len(metrics) == 3
    assert all(0 < len(row['sampled']) < 3 for row in metrics)
    assert collections.Counter(before) == expected_messages(metrics, 0, 0, 3)
    assert collections.Counter(sent) == expected_messages(metrics, 1, 2, 3)


# --- deployment: real processes on loopback ------------------------------------------------------

SLOW = pytest.mark.skipif(not os.environ.get('QUPED_SLOW'),
                          reason='a deployment takes minutes: run with QUPED_SLOW=1 -k deploy')


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Deployment:
    """A SuperLink with TLS and SuperNode authentication, and SuperNodes, as processes on
    127.0.0.1; every process it starts is stopped by its PID."""

    def __init__(self, folder):
        import make_credentials
        self.folder, self.processes = folder, {}
        self.credentials = make_credentials.make(str(folder / 'credentials'), supernodes=4)
        self.port = free_port()
        home = folder / 'flwr'
        home.mkdir()
        (home / 'config.toml').write_text(
            f'[superlink]\ndefault = "trial"\n\n[superlink.trial]\naddress = '
            f'"127.0.0.1:{self.port}"\nroot-certificates = "{self.credentials}/ca.crt"\n')
        bin_dir = os.path.dirname(sys.executable)
        self.env = {**os.environ, 'FLWR_HOME': str(home), 'OMP_NUM_THREADS': str(THREADS),
                    'FLWR_SUPEREXEC_TASK_POLL_INTERVAL': '0.1',  # as docs/flower.md's recipe
                    'PATH': f"{bin_dir}:{os.environ.get('PATH', '')}"}

    def start(self, name, *command):
        log = open(self.folder / f'{name}.log', 'ab')
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                env=self.env, cwd=self.folder)
        log.close()
        return self.processes[name]

    def superlink(self):
        c = self.credentials
        self.start('superlink', 'flower-superlink', '--ssl-ca-certfile', f'{c}/ca.crt',
                   '--ssl-certfile', f'{c}/server.pem', '--ssl-keyfile', f'{c}/server.key',
                   '--enable-supernode-auth', '--port', str(self.port),
                   '--disable-runtime-dependency-installation')
        wait_for(lambda: self.flwr('supernode', 'list').returncode == 0, 60)

    def flwr(self, *args, timeout=60):
        return subprocess.run(['flwr', *args], env=self.env, cwd=self.folder,
                              capture_output=True, text=True, timeout=timeout)

    def register(self, index):
        assert self.flwr('supernode', 'register',
                         f'{self.credentials}/supernode_{index}.pub').returncode == 0

    def supernode(self, index, partition, partitions):
        return self.start(f'supernode_{index}', 'flower-supernode', '--root-certificates',
                          f'{self.credentials}/ca.crt', '--auth-supernode-private-key',
                          f'{self.credentials}/supernode_{index}', '--superlink',
                          f'127.0.0.1:{self.port}', '--port', str(free_port()), '--node-config',
                          f'partition-id={partition} num-partitions={partitions}')

    def online(self):
        listing = self.flwr('supernode', 'list').stdout
        return listing.count(' online ')

    def stop(self, name):
        process = self.processes.pop(name)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def close(self):
        for name in list(self.processes):
            self.stop(name)


def wait_for(condition, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f'not within {seconds} s')


@SLOW
def test_deploy_tls_authenticated_supernodes_restart_and_refusal(cifar_root, tmp_path):
    """One SuperLink (TLS, node authentication) and three SuperNode processes run 3 rounds; the
    rows equal the in-process run's. SuperNode 1 is killed and restarted after round 1 and
    continues its client from its state file. A SuperNode with an unregistered key is refused."""
    deployment = Deployment(tmp_path)
    try:
        deployment.superlink()
        for index in range(3):
            deployment.register(index)
            deployment.supernode(index, index, 3)
        wait_for(lambda: deployment.online() == 3, 60)
        unknown = deployment.supernode(3, 0, 3)
        unknown.wait(timeout=120)
        assert unknown.returncode != 0 and deployment.online() == 3
        config = run_config(cifar_root, tmp_path / 'results', 'deployed', rounds=3,
                            client_fraction=0.67)
        overrides = ' '.join(f'{k}={json.dumps(v) if isinstance(v, str) else v}'
                             for k, v in config.items())
        run = subprocess.Popen(['flwr', 'run', str(flower_app.APP_DIR), 'trial', '--run-config',
                                overrides, '--stream'], env=deployment.env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deployment.processes['run'] = run
        metrics = tmp_path / 'results' / 'deployed' / 'metrics.jsonl'
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 1, 600)
        deployment.stop('supernode_1')
        wait_for(lambda: deployment.online() == 2, 240)  # the SuperLink's heartbeat timeout
        deployment.supernode(1, 1, 3)
        run.wait(timeout=900)
        expected = in_process({**config, 'results_dir': str(tmp_path / 'script')})
        assert rows(metrics.parent) == rows(expected)
        trained = [r + 1 for r, row in enumerate(rows(metrics.parent)) if 1 in row['sampled']]
        assert (metrics.parent / 'clients' / f'client_1.after_{trained[-1]}.pt').is_file()
    finally:
        deployment.close()


def test_the_server_names_missing_partition_ids():
    flower_app.check_partitions({0: 3, 1: 3, 2: 3}, 3, 3)  # complete: no error
    with pytest.raises(runtime.ConfigError, match='partition ids 1, 3 are missing'):
        flower_app.check_partitions({0: 4, 2: 4}, 4, 2)
    with pytest.raises(runtime.ConfigError, match=r'num-partitions \[5\] found'):
        flower_app.check_partitions({0: 5, 1: 5}, 2, 2)
    with pytest.raises(runtime.ConfigError, match='1 SuperNodes share an id'):
        flower_app.check_partitions({0: 2, 1: 2}, 2, 3)


def test_an_unknown_run_config_key_is_named_before_flower_starts(cifar_root, tmp_path):
    config = run_config(cifar_root, tmp_path, 'run', bogus_key=1)
    with pytest.raises(runtime.ConfigError, match="unknown run-config key bogus_key: the app's "
                                                  "keys are main_federated.py's"):
        simulate(config)
    assert not (tmp_path / 'run').exists()


# --- the documented commands -------------------------------------------------------------------

def our_imports(module, seen=None):
    """The modules of this project that `module` imports, directly or through others."""
    seen = set() if seen is None else seen
    tree = ast.parse((ROOT / f'{module}.py').read_text())
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            if (ROOT / f'{name}.py').is_file() and name not in seen:
                seen.add(name)
                our_imports(name, seen)
    return seen


def test_the_app_bundle_holds_every_module_the_app_imports():
    with open(ROOT / 'pyproject.toml', 'rb') as f:
        bundle = set(tomllib.load(f)['tool']['flwr']['app']['fab-include'])
    assert {f'{m}.py' for m in our_imports('flower_app') | {'flower_app'}} <= bundle


def docs_simulation_commands():
    """The two lines of docs/flower.md's simulation block (continuation lines joined)."""
    text = (ROOT / 'docs' / 'flower.md').read_text()
    block = text.split('**Simulation**', 1)[1].split('\n\n')[1]
    return [line.strip() for line in block.replace('\\\n', ' ').splitlines()]


def test_the_docs_simulation_commands_run_as_written(cifar_root, tmp_path):
    """docs/flower.md's `flwr run` line, as written in a shell without the venv on PATH, with a
    small run config added (later values win), gives main_federated.py's rows; its `pkill` line
    stops the SuperLink `flwr run` left running. Whatever is left is stopped by its PID."""
    run_line, stop_line = docs_simulation_commands()
    assert run_line.startswith('PATH=') and stop_line.startswith('pkill ')
    config = {'data_root': str(cifar_root), 'results_dir': str(tmp_path / 'flower'),
              'run_name': 'run', 'n_clients': 3, 'rounds': 2, 'classes_per_client': 4,
              'BATCH_SIZE': 20}
    small = ' '.join(f"{k}='{v}'" if isinstance(v, str) else f'{k}={v}' for k, v in config.items())
    home = tmp_path / 'flwr'
    home.mkdir()
    env = {'HOME': str(tmp_path), 'PATH': '/usr/bin:/bin', 'FLWR_HOME': str(home),
           'OMP_NUM_THREADS': str(THREADS), 'FLWR_LOCAL_SUPERLINK_HTTP_API_PORT': str(free_port()),
           'FLWR_LOCAL_CONTROL_API_PORT': str(free_port())}
    shell = ['bash', '-c']
    superlinks = []

    def superlink_pids():
        found = subprocess.run(['pgrep', '-f', f'flower-superlink .*{home}'], capture_output=True,
                               text=True).stdout.split()
        return [int(pid) for pid in found]
    try:
        done = subprocess.run(shell + [f'{run_line} --federation-config "num-supernodes=3" '
                                       f'--run-config "{small}"'], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        superlinks = superlink_pids()
        assert superlinks, 'flwr run left no local SuperLink to stop'
        subprocess.run(shell + [stop_line], cwd=ROOT, env=env, timeout=60)
        wait_for(lambda: not superlink_pids(), 30)
        expected = in_process({**config, 'results_dir': str(tmp_path / 'script')})
        assert rows(tmp_path / 'flower' / 'run') == rows(expected)
    finally:
        for pid in superlinks + superlink_pids():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_a_relative_path_is_refused_where_flwr_run_installed_the_app(monkeypatch):
    assert flower_app.resolve('data_root', 'data') == str(flower_app.APP_DIR / 'data')
    monkeypatch.setattr(flower_app, 'IN_CHECKOUT', False)
    assert flower_app.resolve('data_root', '/abs/data') == '/abs/data'
    with pytest.raises(runtime.ConfigError, match=r"data_root='data' is a relative path.*"
                       r"give an absolute path, e.g. --run-config \"data_root='\$PWD/data'\""):
        flower_app.resolve('data_root', 'data')
