"""QuPeD on Flower (flwr 1.42): a ClientApp and a ServerApp around federated.py's units, so that
the clients run as Flower SuperNodes (simulated, or real processes on other machines) and a
run writes what main_federated.py writes, with the same numbers.

    PATH="$PWD/.venv/bin:$PATH" flwr run . --stream --federation-config "num-supernodes=20" \
        --run-config "data_root='$PWD/../shared/data/cifar10-mini' results_dir='$PWD/Results'"

(docs/flower.md, which says how to stop the local SuperLink it leaves running).
pyproject.toml's [tool.flwr.app.config] holds exactly main_federated.py's hyperparameters and
defaults (tests/test_flower.py keeps them equal); a run's configuration goes through the same
`--name=value` parsing and checks as the script's.

The server (`server`): waits for the SuperNodes, checks that their partition ids cover
0..n_clients-1, then per round samples with federated.sample_clients, sends the global model to
the sampled clients ('train'), averages their replies with federated.aggregate in partition
order, sends the new global model to every client ('evaluate'), builds the row with
federated.round_row, asks the clients for their quantized models when the round improves
best.pt (a query), and writes metrics.jsonl, best.pt, last.pt, config.json and partition.json
as main_federated.py does.

A client (`client`): its partition id comes from the SuperNode's node_config (`partition-id`,
`num-partitions`). Its private state (model, Adam, centers, batch generator) lives in
Context.state between its train and evaluate messages and, after every round, in a file under
the run folder's `clients/` (or under the node_config's `state-dir`), with the previous round's
copy: a restarted SuperNode, or a resumed run, continues from the round the server is at. The
server's last.pt therefore holds no client state (`clients` None); best.pt holds every client's
quantized model, which the clients send when the server asks (the deliverable, as
main_federated.py's best.pt keeps it).
"""
import ast
import io
import json
import os
import time
import tomllib
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import data
import federated
import resnet
import runs
import runtime

APP_DIR = Path(__file__).resolve().parent
IN_CHECKOUT = (APP_DIR / 'main_federated.py').is_file()  # not in the bundle flwr run installs
KIND = 'flower'  # what this app's run folders are (runs.KINDS)
NODE_WAIT_SECONDS = 300  # how long the server waits for SuperNodes to connect or come back


# --- configuration -----------------------------------------------------------------------------

def pyproject_defaults():
    """[tool.flwr.app.config] of pyproject.toml with its tuples (written as strings, since a run
    config holds only scalars) as tuples: main_federated.py's DEFAULTS."""
    with open(APP_DIR / 'pyproject.toml', 'rb') as f:
        table = tomllib.load(f)['tool']['flwr']['app']['config']
    return {k: ast.literal_eval(v) if isinstance(v, str) and v.startswith('(') else v
            for k, v in table.items()}


def as_text(value):
    return value if isinstance(value, str) else repr(value)


def config_from_run_config(run_config):
    """(configuration, the values that differ from the defaults) from a Flower run config,
    through the script's parsing and checks: a bad value gets main_federated.py's message."""
    defaults = pyproject_defaults()
    parsed = runtime.parse_overrides(defaults, [f'--{k}={as_text(v)}'
                                                for k, v in run_config.items()])
    cfg = {**defaults, **parsed}
    federated.check_config(cfg)
    return cfg, {k: v for k, v in parsed.items() if v != defaults[k]}


def resolve(key, path):
    """A path from the run config: as given if absolute; a relative one is taken from the
    checkout's folder (flower_app.simulate runs there). `flwr run` installs the app's bundle
    under FLWR_HOME, where a relative path would point, so there it is refused."""
    if not path or os.path.isabs(path):
        return path
    if not IN_CHECKOUT:
        raise runtime.ConfigError(
            f"{key}={path!r} is a relative path, but flwr run installed this app under "
            f"{APP_DIR}, not in your checkout: give an absolute path, e.g. "
            f"--run-config \"{key}='$PWD/{path}'\" (docs/flower.md).")
    return str(APP_DIR / path)


def encode(cfg):
    return json.dumps(cfg)


def decode(text):
    """The configuration a message carries, its tuples restored."""
    cfg = json.loads(text)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def from_bytes(blob):
    return torch.load(io.BytesIO(blob), map_location='cpu', weights_only=True)


# --- the client ------------------------------------------------------------------------------

client = ClientApp()
DATA = {}  # per process: the data and partition, and each client's images, kept across messages
STATES = {}  # per process: (run folder, client) -> (rounds completed, the client's state)


def node_setting(context, key, default=None):
    return context.node_config.get(key, default)


def partition_id(context):
    return int(node_setting(context, 'partition-id'))


def client_data(cfg, context, dev):
    """(partition, images) of the client, the data loaded and split once per process (a
    simulated SuperNode's process serves many clients)."""
    root = node_setting(context, 'data-root') or resolve('data_root', cfg['data_root'])
    key = (root, str(dev), json.dumps({k: cfg[k] for k in (
        'partition', 'n_clients', 'classes_per_client', 'dirichlet_alpha', 'val_fraction',
        'BATCH_SIZE', 'seed', 'client_archs', 'client_bits')}))
    if key not in DATA:
        cifar = data.load_cifar10(root, dev)
        DATA.clear()
        DATA[key] = cifar, federated.make_partition({**cfg, 'data_root': root}, cifar), {}
    cifar, parts, datasets = DATA[key]
    client_id = partition_id(context)
    if client_id not in datasets:
        datasets[client_id] = federated.client_dataset(cifar, parts[client_id])
    return parts[client_id], datasets[client_id]


def state_paths(cfg_folder, context):
    folder = node_setting(context, 'state-dir') or os.path.join(cfg_folder, 'clients')
    os.makedirs(folder, exist_ok=True)
    latest = os.path.join(folder, f'client_{partition_id(context)}.pt')
    return latest, latest + '.previous'


def load_state(cfg, context, folder, dev, completed):
    """The client's state after `completed` rounds: from Context.state when it is there, else
    from its files (a restarted SuperNode, a resumed run), else new (round 0)."""
    client_id = partition_id(context)
    record = context.state.get('client')
    kept = STATES.get((folder, client_id))
    if record is not None and record['completed'] == completed:
        if kept is not None and kept[0] == completed:  # this process holds it already
            return kept[1]
        if 'state' in record:  # not yet in its file
            state = federated.new_client_state(cfg, client_id, dev)
            federated.load_client_state(state, from_bytes(record['state'])['state'])
            return state
    state = federated.new_client_state(cfg, client_id, dev)
    for path in state_paths(folder, context):
        if os.path.isfile(path):
            saved = torch.load(path, map_location='cpu', weights_only=True)
            if saved['completed'] == completed:
                federated.load_client_state(state, saved['state'])
                return state
    if completed:
        raise runtime.ConfigError(
            f"client {client_id} has no state after round {completed} in Context.state or in "
            f"{state_paths(folder, context)[0]}: it cannot continue this run.")
    return state


def keep_state(context, folder, state, completed, to_file):
    """The client's state after `completed` rounds, serialised once: with `to_file` into its
    file (the previous round's file kept beside it), Context.state then holding only the round;
    else into Context.state, for the next message (a deployment's next process)."""
    payload = runs.torch_bytes({'completed': completed,
                                'state': federated.saved_client_state(state)})
    STATES[(folder, partition_id(context))] = (completed, state)
    if to_file:
        latest, previous = state_paths(folder, context)
        if os.path.isfile(latest):
            os.replace(latest, previous)
        runs.write_atomic(latest, payload)
        context.state['client'] = ConfigRecord({'completed': completed})
    else:
        context.state['client'] = ConfigRecord({'completed': completed, 'state': payload})


def client_setup(msg, context):
    settings = msg.content['config']
    cfg = decode(settings['cfg'])
    dev = runtime.select_device(cfg['device'])
    runtime.seed_everything(cfg['seed'], dev)
    return cfg, settings, dev


def best_entry(cfg, context, settings, dev):
    """The serialised best_client_entry after the round: a fine-tuned copy (FedAvg-QFT), in no
    file, as its evaluation kept it in Context.state; else from the client's saved state."""
    kept = context.state.get('best')
    if kept is not None and kept['round'] == settings['round']:
        return kept['entry']
    state = load_state(cfg, context, settings['folder'], dev, settings['round'] + 1)
    return runs.torch_bytes(federated.best_client_entry(cfg, partition_id(context), state))


@client.query()
def describe(msg, context):
    """The client's partition id and count, for the server's check, and its partition (none
    for an id outside the run's clients, which the server then names); or, when the server
    asks for it ('want': 'best'), its quantized model after the round, for best.pt."""
    cfg, settings, dev = client_setup(msg, context)
    if settings.get('want') == 'best':
        return Message(RecordDict({'reply': ConfigRecord({'best': best_entry(
            cfg, context, settings, dev)})}), reply_to=msg)
    inside = 0 <= partition_id(context) < cfg['n_clients']
    part = client_data(cfg, context, dev)[0] if inside else None
    return Message(RecordDict({'reply': ConfigRecord({
        'partition-id': partition_id(context),
        'num-partitions': int(node_setting(context, 'num-partitions')),
        'part': json.dumps(part)})}), reply_to=msg)


@client.train()
def train(msg, context):
    """federated.client_round on this client: its copy of the global model after local
    training, its aggregation weight and its training metrics."""
    cfg, settings, dev = client_setup(msg, context)
    rnd, folder = settings['round'], settings['folder']
    _, dataset = client_data(cfg, context, dev)
    state = load_state(cfg, context, folder, dev, completed=rnd)
    global_copy = global_state = None
    if 'global' in msg.content:
        global_copy = resnet.build(cfg['global_arch']).to(dev)
        received = msg.content['global'].to_torch_state_dict()
        global_state = {k: v.to(dev) for k, v in received.items()}
    new_state, weight, metrics = federated.client_round(cfg, partition_id(context), state,
                                                        global_state, global_copy, dataset, rnd)
    keep_state(context, folder, state, rnd + 1, to_file=False)
    content = {'reply': ConfigRecord({'weight': weight, 'metrics': json.dumps(metrics)})}
    if new_state is not None:
        content['global'] = ArrayRecord(new_state)
    return Message(RecordDict(content), reply_to=msg)


@client.evaluate()
def evaluate(msg, context):
    """federated.evaluate_client on this client; its state is then saved (the server asks for
    its quantized model when the round improves best.pt)."""
    cfg, settings, dev = client_setup(msg, context)
    rnd, folder = settings['round'], settings['folder']
    trained = json.loads(settings['trained'])
    _, dataset = client_data(cfg, context, dev)
    state = load_state(cfg, context, folder, dev, completed=rnd + (trained is not None))
    global_model = None
    if 'global' in msg.content:
        global_model = resnet.build(cfg['global_arch']).to(dev)
        global_model.load_state_dict(msg.content['global'].to_torch_state_dict())
    client_id = partition_id(context)
    entry = federated.evaluate_client(cfg, client_id, state, global_model, dataset, rnd,
                                      trained, settings['sent'])
    keep_state(context, folder, state, rnd + 1, to_file=True)
    if federated.keeps_client_models(cfg) and not federated.algorithm_of(cfg).personalised:
        context.state['best'] = ConfigRecord({'round': rnd, 'entry': runs.torch_bytes(
            federated.best_client_entry(cfg, client_id, state))})
    return Message(RecordDict({'reply': ConfigRecord({'entry': json.dumps(entry)})}),
                   reply_to=msg)


# --- the server ------------------------------------------------------------------------------

server = ServerApp()


def message(node, kind, rnd, settings, global_record=None):
    """A message to `node`; `global_record`, the global model's ArrayRecord, is built once per
    phase and shared by its messages."""
    content = {'config': ConfigRecord(settings)}
    if global_record is not None:
        content['global'] = global_record
    return Message(RecordDict(content), dst_node_id=node, message_type=kind,
                   group_id=str(rnd))


NODE_UNAVAILABLE = 5  # flwr's ErrorCode.NODE_UNAVAILABLE: its SuperNode went offline
POLL_SECONDS = 0.05  # between pulls of replies


def send_and_receive(grid, messages):
    """Grid.send_and_receive through the Grid's public push and pull, polling every
    POLL_SECONDS: Flower 1.42's HttpGrid (a deployment) sleeps 3 s between its pulls."""
    waiting, replies = set(grid.push_messages(messages)), []
    while waiting:
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
        if waiting:
            time.sleep(POLL_SECONDS)
    return replies


def exchange(grid, requests):
    """The replies to `requests` [(node, kind, round, settings, global record)], every one of
    them. A SuperNode that went offline (killed, restarted) gets its message again once it is
    back, for up to NODE_WAIT_SECONDS; any other failure is an error naming it."""
    pending, replies = list(requests), []
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while pending:
        answers = send_and_receive(grid, [message(*request) for request in pending])
        by_node = {answer.metadata.src_node_id: answer for answer in answers
                   if not answer.has_error()}
        failed = [answer for answer in answers if answer.has_error()]
        fatal = [answer for answer in failed if answer.error.code != NODE_UNAVAILABLE]
        if fatal or (failed and time.monotonic() > deadline):
            reason = (fatal or failed)[0].error.reason
            raise runtime.ConfigError(f"{len(fatal or failed)} of {len(requests)} clients did "
                                      f"not reply ({reason}).")
        replies += by_node.values()
        pending = [request for request in pending if request[0] not in by_node]
        if pending:
            time.sleep(2)  # a restarted SuperNode needs a moment to be back online
    return replies


def check_partitions(found, n_clients, connected):
    """Refuse SuperNodes whose partition ids ({id: num-partitions}) do not cover
    0..n_clients-1 exactly once, naming the missing ids."""
    missing = [i for i in range(n_clients) if i not in found]
    wrong = sorted(set(found.values()) - {n_clients})
    if missing or wrong or len(found) != connected:
        raise runtime.ConfigError(
            f"the SuperNodes' partition ids must be 0..{n_clients - 1} with "
            f"num-partitions={n_clients}: "
            + (f"partition ids {', '.join(map(str, missing))} are missing; " if missing else '')
            + (f"num-partitions {wrong} found; " if wrong else '')
            + (f"{connected - len(found)} SuperNodes share an id; "
               if connected > len(found) else '')
            + f"{connected} SuperNodes connected. Start one SuperNode per partition, each with "
              f"--node-config \"partition-id=<i> num-partitions={n_clients}\".")


def connect(grid, cfg, settings):
    """{partition id: node id} for n_clients SuperNodes whose ids cover 0..n_clients-1, and the
    partition they report, in client order."""
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while len(list(grid.get_node_ids())) < cfg['n_clients'] and time.monotonic() < deadline:
        time.sleep(1)
    nodes = list(grid.get_node_ids())
    replies = exchange(grid, [(node, MessageType.QUERY, 0, settings) for node in nodes])
    found = {}
    for reply in replies:
        record = reply.content['reply']
        found[record['partition-id']] = (reply.metadata.src_node_id, record)
    check_partitions({i: record['num-partitions'] for i, (_, record) in found.items()},
                     cfg['n_clients'], len(nodes))
    return ({i: found[i][0] for i in range(cfg['n_clients'])},
            [json.loads(found[i][1]['part']) for i in range(cfg['n_clients'])])


def aggregate_replies(replies):
    """federated.aggregate of {client: train reply}, in client (partition) order whatever the
    order the replies arrived in: a sum in arrival order moves the floats (by up to 1.2e-7)."""
    clients = sorted(replies)
    return federated.aggregate(
        [replies[c].content['global'].to_torch_state_dict() for c in clients],
        [replies[c].content['reply']['weight'] for c in clients])


def flower_round(grid, cfg, run, rnd):
    """One round over Flower: train the sampled clients, aggregate in partition order,
    evaluate every client; the round's row."""
    nodes, global_model = run['nodes'], run['global_model']
    settings = {'cfg': encode(cfg), 'round': rnd, 'folder': run['folder']}
    sampled = federated.sample_clients(cfg, run['sampler'])
    record = None if global_model is None else ArrayRecord(federated.model_state(global_model))
    begin = time.perf_counter()
    replies = exchange(grid, [(nodes[c], MessageType.TRAIN, rnd, settings, record)
                              for c in sampled])
    by_client = {run['clients_of'][r.metadata.src_node_id]: r for r in replies}
    trained = {c: json.loads(by_client[c].content['reply']['metrics']) for c in sampled}
    if global_model is not None:
        global_model.load_state_dict(aggregate_replies(by_client))
    middle = time.perf_counter()
    record = None if global_model is None else ArrayRecord(federated.model_state(global_model))
    sent = 0 if global_model is None else federated.model_bytes(global_model)
    replies = exchange(grid, [(nodes[c], MessageType.EVALUATE, rnd,
                               {**settings, 'trained': json.dumps(trained.get(c)), 'sent': sent},
                               record) for c in range(cfg['n_clients'])])
    by_client = {run['clients_of'][r.metadata.src_node_id]: r.content['reply'] for r in replies}
    entries = [json.loads(by_client[c]['entry']) for c in range(cfg['n_clients'])]
    timings = {'train_seconds': middle - begin, 'eval_seconds': time.perf_counter() - middle}
    row = federated.round_row(cfg, rnd, entries, timings)
    if federated.keeps_client_models(cfg) and federated.improves(run, row):
        run['best_entries'] = best_entries(grid, cfg, run, settings)
    return row


def best_entries(grid, cfg, run, settings):
    """Every client's quantized model after the round, asked for only when the round improves
    best.pt, so that the other rounds send and decode none."""
    replies = exchange(grid, [(run['nodes'][c], MessageType.QUERY, settings['round'],
                               {**settings, 'want': 'best'}) for c in range(cfg['n_clients'])])
    by_client = {run['clients_of'][r.metadata.src_node_id]: r.content['reply'] for r in replies}
    return [from_bytes(by_client[c]['best']) for c in range(cfg['n_clients'])]


def save(cfg, run, rows):
    """best.pt when the round improves on the validation accuracy, and last.pt (without the
    clients' states, which the clients keep)."""
    row, files = rows[-1], {}
    if federated.improves(run, row):
        run['best'] = row[federated.SELECTION]
        files.update(federated.best_file(KIND, cfg, run['folder'], row, run['best_entries'],
                                         run['global_model']))
    files.update(federated.last_file(KIND, cfg, run['folder'], rows, None, run['global_model'],
                                     run['sampler'], run['best'], None))
    federated.write_checkpoints(files)


def serve(grid, context):
    """The run: configuration, clients' check, then the rounds; returns the run folder."""
    cfg, overrides = config_from_run_config(context.run_config)
    checkpoint = None
    for key in ('data_root', 'results_dir', 'resume', 'pretrained_path', 'global_pretrained'):
        cfg[key] = resolve(key, cfg[key])
    if federated.ALGORITHMS[cfg['algorithm']].client_update is None:
        raise runtime.ConfigError(f"algorithm={cfg['algorithm']!r} trains no client, so it has "
                                  f"nothing to run on Flower: run it with python "
                                  f"main_federated.py --algorithm={cfg['algorithm']}")
    if cfg['resume']:
        cfg, checkpoint = runs.resume(cfg['resume'], overrides, federated.RESUMABLE, KIND,
                                      pyproject_defaults(), federated.check_config)
    dev = torch.device('cpu')  # the server only averages
    runtime.seed_everything(cfg['seed'], dev)
    folder = cfg['resume'] or runs.new_run_folder(
        cfg['results_dir'], cfg['run_name'] or federated.default_run_name(cfg), KIND)
    with runs.locked(folder):
        return serve_in(grid, cfg, checkpoint, folder, dev)


def serve_in(grid, cfg, checkpoint, folder, dev):
    """The rounds, in the (locked) run folder."""
    if checkpoint is None:
        cfg['run_name'] = os.path.basename(os.path.normpath(folder))
        rows = []
    else:
        rows = checkpoint['rows']
    run = {'folder': folder, 'global_model': federated.new_global_model(cfg, dev),
           'sampler': torch.Generator().manual_seed(cfg['seed']), 'best': -1.0,
           'best_entries': []}
    nodes, parts = connect(grid, cfg, {'cfg': encode(cfg), 'round': 0, 'folder': folder})
    run.update(nodes=nodes, clients_of={node: c for c, node in nodes.items()})
    if checkpoint is not None:
        if run['global_model'] is not None:
            run['global_model'].load_state_dict(checkpoint['global'])
        runtime.restore_rng_states(checkpoint, run['sampler'])
        run['best'] = checkpoint['best']
        runs.write_rows(folder, rows)
        print(f"resuming {folder} after round {len(rows)}")
    runs.write_config(folder, cfg, KIND)
    runs.write_json(os.path.join(folder, 'partition.json'), parts)
    runs.train_loop(folder, rows, cfg['rounds'], lambda rnd: flower_round(grid, cfg, run, rnd),
                    lambda rows: save(cfg, run, rows), federated.round_line(cfg), KIND)
    return folder


@server.main()
def main(grid: Grid, context: Context) -> None:
    """serve(), with a bad configuration or a missing client ended by one paragraph."""
    try:
        folder = serve(grid, context)
    except (runtime.ConfigError, runtime.Diverged, runtime.OutputError, resnet.CheckpointError,
            data.DataError, data.PartitionError) as e:
        print(f"error: {e}")
        raise SystemExit(2) from None
    print(f"done: outputs in {folder}")



# --- simulation from Python --------------------------------------------------------------------

def simulate(run_config, num_supernodes, backend_config=None):
    """A Flower simulation of this app with `run_config` overrides, as `flwr run .
    --run-config ...` runs it: the run config fused from pyproject.toml's defaults and the
    overrides, the ClientApp on `num_supernodes` simulated SuperNodes (partition-id and
    num-partitions set by the engine). Flower 1.42's public run_simulation passes no run config,
    so this calls the function it wraps."""
    from flwr.common.config import get_fused_config_from_dir
    from flwr.simulation.run_simulation import EventType, _run_simulation

    unknown = sorted(set(run_config) - set(pyproject_defaults()))
    if unknown:
        raise runtime.ConfigError(
            f"unknown run-config key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: the "
            f"app's keys are main_federated.py's hyperparameters "
            f"({', '.join(pyproject_defaults())}).")
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                      run_config=get_fused_config_from_dir(APP_DIR, dict(run_config)))
    result = _run_simulation(num_supernodes=num_supernodes, client_app=client, server_app=server,
                             backend_config=backend_config, server_app_context=context,
                             run=None, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE)
    return result
