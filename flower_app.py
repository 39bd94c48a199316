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
0..n_clients-1, then per round samples with federated.sample_clients and sends one message per
client: round r + 1's training ('train', with the global model after round r) to the clients
sampled for it, which first evaluate round r with that same model, and round r's evaluation
alone ('evaluate') to the others (all of them after the last round; the first round, and the
first after a resume, send their training alone). It averages the training replies with
federated.aggregate in partition order, builds each row with federated.round_row, asks the
clients for their quantized models when the round improves best.pt (a query), and writes
metrics.jsonl, best.pt, last.pt, config.json and partition.json as main_federated.py does. A
row's train_seconds is its whole phase (its evaluation shares messages with the next round's
training), eval_seconds 0.

A client (`client`): its partition id comes from the SuperNode's node_config (`partition-id`,
`num-partitions`). Its private state (model, Adam, centers, batch generator) is written after
each of its trainings to a file under the run folder's `clients/` (or under the node_config's
`state-dir`), named by the rounds it has completed, and kept in the process between messages;
each message names the state it needs, so a new process (a deployment), a restarted SuperNode or
a resumed run reads it back. Files no resume from last.pt can need are removed. The server's
last.pt therefore holds no client state (`clients` None); best.pt holds every client's
quantized model, which the clients send when the server asks (the deliverable, as
main_federated.py's best.pt keeps it).
"""
import ast
import contextlib
import functools
import io
import json
import math
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
STATES = {}  # per process: (run folder, client) -> (its last training's round + 1, its state)
FEDERATED_SECONDS = [0.0]  # per process: the current handler's time inside federated.py
MODELS = {}  # per process: the global model's (architecture, device) -> the model, reused


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


def state_folder(run_folder, context):
    folder = node_setting(context, 'state-dir') or os.path.join(run_folder, 'clients')
    os.makedirs(folder, exist_ok=True)
    return folder


def state_file(run_folder, context, after):
    """The client's state once it has trained in round `after` - 1 (after `after` rounds)."""
    return os.path.join(state_folder(run_folder, context),
                        f'client_{partition_id(context)}.after_{after}.pt')


def load_state(cfg, context, folder, dev, after):
    """The client's state after the rounds up to its last training, `after` (which the server
    names; 0: it has not trained): this process's copy when it holds that one, else its file (a
    deployment's new process, a restarted SuperNode, a resumed run), else new (0)."""
    client_id = partition_id(context)
    kept = STATES.get((folder, client_id))
    if kept is not None and kept[0] == after:
        return kept[1]
    state = federated.new_client_state(cfg, client_id, dev)
    path = state_file(folder, context, after)
    if os.path.isfile(path):
        federated.load_client_state(state, torch.load(path, map_location='cpu',
                                                      weights_only=True))
    elif after:
        raise runtime.ConfigError(
            f"client {client_id} has no state after round {after} ({path} is missing): it "
            f"cannot continue this run.")
    if kept is None or after >= kept[0]:  # an older state, asked for by best.pt, is not kept
        STATES[(folder, client_id)] = (after, state)
    return state


def keep_state(context, folder, state, after, keep):
    """The client's state after training in round `after` - 1, serialised once into its file,
    which is all the next message needs (Context.state holds none of it). Files older than
    `keep`, which no resume from the server's last.pt can ask for, are removed."""
    STATES[(folder, partition_id(context))] = (after, state)
    runs.write_atomic(state_file(folder, context, after),
                      runs.torch_bytes(federated.saved_client_state(state)))
    prefix, states = f'client_{partition_id(context)}.after_', state_folder(folder, context)
    for name in os.listdir(states):
        if name.startswith(prefix) and name.endswith('.pt') and \
                int(name[len(prefix):-3]) < keep:
            os.remove(os.path.join(states, name))


def timed(handler):
    """A handler whose reply says how long it ran ('handler_seconds'), how much of that was
    inside federated.py's units ('federated_seconds', added up by `in_federated`), and when, on
    this machine's clock ('started', 'ended'): where a Flower round's time goes
    (round_timings)."""
    @functools.wraps(handler)
    def run(msg, context):
        started, clock = time.time(), time.perf_counter()
        FEDERATED_SECONDS[0] = 0.0
        reply = handler(msg, context)
        reply.content['reply'] = ConfigRecord({
            **reply.content['reply'], 'handler_seconds': time.perf_counter() - clock,
            'federated_seconds': FEDERATED_SECONDS[0], 'started': started,
            'ended': time.time()})
        return reply
    return run


@contextlib.contextmanager
def in_federated():
    clock = time.perf_counter()
    try:
        yield
    finally:
        FEDERATED_SECONDS[0] += time.perf_counter() - clock


def client_setup(msg, context):
    settings = msg.content['config']
    cfg = decode(settings['cfg'])
    dev = runtime.select_device(cfg['device'])
    runtime.seed_everything(cfg['seed'], dev)
    return cfg, settings, dev


def received_global(cfg, msg, dev):
    """This process's global model (one, reused) with the message's weights; None if the message
    carries none (`local`)."""
    if 'global' not in msg.content:
        return None
    key = (cfg['global_arch'], str(dev))
    if key not in MODELS:
        MODELS.clear()
        MODELS[key] = resnet.build(cfg['global_arch']).to(dev)
    state = {k: v.to(dev) for k, v in msg.content['global'].to_torch_state_dict().items()}
    MODELS[key].load_state_dict(state)
    return MODELS[key], state


def evaluated_entry(cfg, context, settings, state, global_model, dataset):
    """federated.evaluate_client of round settings['evaluate'] as a JSON reply field (FedAvg-QFT's
    fine-tuned copy, in no file, kept in Context.state for the server's request)."""
    rnd, client_id = settings['evaluate'], partition_id(context)
    with in_federated():
        entry = federated.evaluate_client(cfg, client_id, state, global_model, dataset, rnd,
                                          json.loads(settings['trained']), settings['sent'])
    if federated.keeps_client_models(cfg) and not federated.algorithm_of(cfg).personalised:
        context.state['best'] = ConfigRecord({'round': rnd, 'entry': runs.torch_bytes(
            federated.best_client_entry(cfg, client_id, state))})
    return json.dumps(entry)


def best_entry(cfg, context, settings, dev):
    """The serialised best_client_entry after the round: a fine-tuned copy (FedAvg-QFT), as its
    evaluation kept it in Context.state; else from the client's state of that round."""
    kept = context.state.get('best')
    if kept is not None and kept['round'] == settings['round']:
        return kept['entry']
    state = load_state(cfg, context, settings['folder'], dev, settings['state'])
    with in_federated():
        entry = federated.best_client_entry(cfg, partition_id(context), state)
    return runs.torch_bytes(entry)


@client.query()
@timed
def describe(msg, context):
    """The client's partition id and count, for the server's check, and its partition (none
    for an id outside the run's clients, which the server then names), its data and new state
    made ready for round 1; or, when the server asks for it ('want': 'best'), its quantized
    model after the round, for best.pt."""
    cfg, settings, dev = client_setup(msg, context)
    if settings.get('want') == 'best':
        return Message(RecordDict({'reply': ConfigRecord({'best': best_entry(
            cfg, context, settings, dev)})}), reply_to=msg)
    part = None
    if 0 <= partition_id(context) < cfg['n_clients']:
        part = client_data(cfg, context, dev)[0]
        # its new state built before round 1, as main_federated.py builds its clients' (the
        # first optimizer imports torch._dynamo, about 1.5 s a process)
        load_state(cfg, context, settings['folder'], dev, 0)
    return Message(RecordDict({'reply': ConfigRecord({
        'partition-id': partition_id(context),
        'num-partitions': int(node_setting(context, 'num-partitions')),
        'part': json.dumps(part)})}), reply_to=msg)


@client.train()
@timed
def train(msg, context):
    """The previous round's evaluation when the message asks for it ('evaluate'), with the
    model it carries, then federated.client_round on this client with the same model: the
    evaluation's entry, the client's copy of the global model after local training, its
    aggregation weight and its training metrics."""
    cfg, settings, dev = client_setup(msg, context)
    rnd, folder = settings['round'], settings['folder']
    _, dataset = client_data(cfg, context, dev)
    state = load_state(cfg, context, folder, dev, settings['state'])
    global_copy, global_state = received_global(cfg, msg, dev) or (None, None)
    reply = {}
    if 'evaluate' in settings:
        reply['entry'] = evaluated_entry(cfg, context, settings, state, global_copy, dataset)
    STATES.pop((folder, partition_id(context)))  # changed from here on, until keep_state
    with in_federated():
        new_state, weight, metrics = federated.client_round(
            cfg, partition_id(context), state, global_state, global_copy, dataset, rnd)
    keep_state(context, folder, state, rnd + 1, settings['keep'])
    content = {'reply': ConfigRecord({**reply, 'weight': weight, 'metrics': json.dumps(metrics)})}
    if new_state is not None:
        content['global'] = ArrayRecord(new_state)
    return Message(RecordDict(content), reply_to=msg)


@client.evaluate()
@timed
def evaluate(msg, context):
    """federated.evaluate_client on a client that does not train next round (or after the last
    one); its state is unchanged, so nothing is written."""
    cfg, settings, dev = client_setup(msg, context)
    _, dataset = client_data(cfg, context, dev)
    state = load_state(cfg, context, settings['folder'], dev, settings['state'])
    global_model = (received_global(cfg, msg, dev) or (None,))[0]
    entry = evaluated_entry(cfg, context, settings, state, global_model, dataset)
    return Message(RecordDict({'reply': ConfigRecord({'entry': entry})}), reply_to=msg)


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


def exchange(grid, requests, seen=None):
    """The replies to `requests` [(node, kind, round, settings, global record)], every one of
    them (also appended to `seen`). A SuperNode that went offline (killed, restarted) gets its message again once it is
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
    if seen is not None:
        seen += replies
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


def state_after(history, client, rnd):
    """Rounds completed when `client` last trained up to round `rnd` (0-based; 0 when it has
    not): which of its states a message asks for. `history`: the sampled clients per round."""
    return next((r + 1 for r in range(min(rnd, len(history) - 1), -1, -1)
                 if client in history[r]), 0)


def train_messages(run, rnd, sampled, record, settings, saved, evaluation=None):
    """Round `rnd`'s train message to each sampled client, each carrying the evaluation of round
    rnd - 1 (`evaluation`: {client: settings}) when there is one. `saved`: the rows last.pt
    holds, whose resume needs each client's state after its last training before them."""
    history = run['history']
    return [(run['nodes'][c], MessageType.TRAIN, rnd, {
        **settings, **(evaluation or {}).get(c, {}), 'round': rnd,
        'state': state_after(history, c, rnd - 1),
        'keep': state_after(history, c, saved - 1)}, record) for c in sampled]


def flower_round(grid, cfg, run, rnd):
    """Round `rnd` over Flower, one message per client: the sampled clients' training (sent
    with round rnd - 1's evaluation, or alone in the first round and after a resume), the
    aggregation in partition order, then every client's evaluation of the new global model,
    sent with round rnd + 1's training to the clients sampled for it. The round's row."""
    begin, global_model = time.perf_counter(), run['global_model']
    run['replies'] = []  # every reply of the round, for round_timings
    settings = {'cfg': encode(cfg), 'folder': run['folder']}
    if run['pending'] is None:
        sampled = federated.sample_clients(cfg, run['sampler'])
        run['history'].append(sampled)
        record = None if global_model is None else ArrayRecord(federated.model_state(global_model))
        run['pending'] = replies_by_client(run, exchange(grid, train_messages(
            run, rnd, sampled, record, settings, rnd), run['replies']))
    replies, sampled = run.pop('pending'), run['history'][rnd]
    trained = {c: json.loads(replies[c].content['reply']['metrics']) for c in sampled}
    if global_model is not None:
        global_model.load_state_dict(aggregate_replies(replies))
    run['saved_sampler'] = run['sampler'].get_state()  # last.pt's, before round rnd + 1 draws
    record = None if global_model is None else ArrayRecord(federated.model_state(global_model))
    sent = 0 if global_model is None else federated.model_bytes(global_model)
    evaluation = {c: {'evaluate': rnd, 'trained': json.dumps(trained.get(c)), 'sent': sent}
                  for c in range(cfg['n_clients'])}
    following = []
    if rnd + 1 < cfg['rounds']:
        following = federated.sample_clients(cfg, run['sampler'])
        run['history'].append(following)
    requests = train_messages(run, rnd + 1, following, record, settings, rnd, evaluation) + [
        (run['nodes'][c], MessageType.EVALUATE, rnd, {
            **settings, **evaluation[c], 'state': state_after(run['history'], c, rnd)}, record)
        for c in range(cfg['n_clients']) if c not in following]
    answers = replies_by_client(run, exchange(grid, requests, run['replies']))
    entries = [json.loads(answers[c].content['reply']['entry']) for c in range(cfg['n_clients'])]
    run['pending'] = ({c: answers[c] for c in following} if rnd + 1 < cfg['rounds'] else
                      None)
    row = federated.round_row(cfg, rnd, entries, {'train_seconds': 0.0, 'eval_seconds': 0.0})
    if federated.keeps_client_models(cfg) and federated.improves(run, row):
        run['best_entries'] = best_entries(grid, cfg, run, settings, rnd)
    return {**row, **round_timings(time.perf_counter() - begin, run.pop('replies'))}


def round_timings(seconds, replies):
    """A Flower row's times: the round's whole phase (train_seconds; its evaluation shares
    messages with the next round's training, so eval_seconds is 0), the clients' time inside
    their handlers and inside federated.py's units (summed over clients: the difference is this
    app's glue), and the part of the round when no handler ran (the engine's share: Flower's
    messages and Ray's scheduling; from the replies' clocks, exact where they share the
    server's, as in a simulation)."""
    records = [reply.content['reply'] for reply in replies]
    busy, end = 0.0, -math.inf
    for started, ended in sorted((r['started'], r['ended']) for r in records):
        busy += max(0.0, ended - max(started, end))
        end = max(end, ended)
    return {'train_seconds': seconds, 'eval_seconds': 0.0, 'wall_seconds': seconds,
            'client_handler_seconds': sum(r['handler_seconds'] for r in records),
            'client_federated_seconds': sum(r['federated_seconds'] for r in records),
            'clients_idle_seconds': max(0.0, seconds - busy)}


def replies_by_client(run, replies):
    return {run['clients_of'][r.metadata.src_node_id]: r for r in replies}


def best_entries(grid, cfg, run, settings, rnd):
    """Every client's quantized model after round `rnd`, asked for only when the round improves
    best.pt, so that the other rounds send and decode none."""
    replies = replies_by_client(run, exchange(grid, [
        (run['nodes'][c], MessageType.QUERY, rnd, {
            **settings, 'want': 'best', 'round': rnd,
            'state': state_after(run['history'], c, rnd)}) for c in range(cfg['n_clients'])],
        run['replies']))
    return [from_bytes(replies[c].content['reply']['best']) for c in range(cfg['n_clients'])]


def save(cfg, run, rows):
    """best.pt when the round improves on the validation accuracy, and last.pt (without the
    clients' states, which the clients keep)."""
    row, files = rows[-1], {}
    if federated.improves(run, row):
        run['best'] = row[federated.SELECTION]
        files.update(federated.best_file(KIND, cfg, run['folder'], row, run['best_entries'],
                                         run['global_model']))
    sampler = torch.Generator()
    sampler.set_state(run['saved_sampler'])
    files.update(federated.last_file(KIND, cfg, run['folder'], rows, None, run['global_model'],
                                     sampler, run['best'], None))
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
           'best_entries': [], 'history': [row['sampled'] for row in rows], 'pending': None}
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

SIMULATED_CLIENT = {'client_resources': {'num_cpus': 1, 'num_gpus': 0}}  # simulate's default


def simulate(run_config, num_supernodes, backend_config=None):
    """A Flower simulation of this app with `run_config` overrides, as `flwr run .
    --run-config ...` runs it: the run config fused from pyproject.toml's defaults and the
    overrides, the ClientApp on `num_supernodes` simulated SuperNodes (partition-id and
    num-partitions set by the engine). Each simulated client gets one CPU, so one torch thread
    (Ray sets OMP_NUM_THREADS to its CPUs), and Ray runs as many at once as there are cores:
    Flower's default of two CPUs runs two-thread clients beside Ray's and the server's processes,
    which collapsed on a 2-core machine (docs/flower.md). Flower 1.42's public run_simulation
    passes no run config, so this calls the function it wraps."""
    import copy
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
    return _run_simulation(num_supernodes=num_supernodes, client_app=client, server_app=server,
                           backend_config=copy.deepcopy(backend_config or SIMULATED_CLIENT),
                           server_app_context=context, run=None,
                           exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE)
