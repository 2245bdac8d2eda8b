"""
The hand-over of a trained model to the trusted evaluator (harness code: pinned, the agent may read it, never
change it). train.py calls export_model() once training ends; the evaluator (training/evaluator.py), a fresh
process that runs no agent code, reads the file back with load_program() and scores it.

The file holds the model's logits-only forward, model(idx) -> logits [B, T, vocab], as a torch.export graph
with static shapes, and its weights. Nothing in it is Python the evaluator would run: the graph is JSON checked
against an allow-list of pure tensor ops before torch reads it, and the weights are plain tensors read with
torch.load(weights_only=True). torch.export.save/load are not used because their archive unpickles arbitrary
objects and carries guard code that is compiled on load.
"""

import io
import json
import os
import zipfile
from pathlib import Path

import torch

FORMAT = "autoresearch-graph/1"
# Set by the run manager to the file train.py hands the model over in (in the run's directory); unset when a
# human runs train.py directly, who then gets val_bpb from prepare.evaluate_bpb in process.
HANDOVER_ENV = "AUTORESEARCH_HANDOVER"

# Rows per evaluation batch for each profile (the sequence length is the profile's MAX_SEQ_LEN). The graph is
# exported with this static shape; which rows are scored never depends on it (the last batch is padded).
EVAL_BATCH_ROWS = {"gpu": 32, "small": 16, "cpu": 8, "smoke": 8}

# The ops a GPT's forward needs, by namespace and name (any overload but `out`). Pure functions of their inputs
# only: nothing in place (names ending in "_"), nothing random, nothing that reads a tensor's value into Python.
ALLOWED_ATEN = frozenset("""
    _assert_tensor_metadata _to_copy to type_as clone contiguous alias detach lift_fresh_copy
    view reshape _unsafe_view view_as permute transpose t expand expand_as unsqueeze squeeze flatten unflatten
    slice select narrow cat stack split split_with_sizes chunk unbind index index_select gather take_along_dim
    roll flip repeat repeat_interleave pad constant_pad_nd
    embedding linear matmul mm bmm addmm baddbmm einsum outer
    add sub rsub mul div neg reciprocal pow sqrt rsqrt exp exp2 expm1 log log2 log1p abs sign square
    sin cos tanh sigmoid relu relu6 gelu silu mish softplus hardtanh hardsigmoid hardswish elu leaky_relu erf
    clamp clamp_min clamp_max minimum maximum where masked_fill lerp fmod remainder floor ceil round trunc
    eq ne lt le gt ge logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_not
    sum mean amax amin max min var std var_mean prod cumsum cumprod logsumexp norm linalg_vector_norm all any
    softmax log_softmax _softmax _log_softmax
    layer_norm native_layer_norm rms_norm _fused_rms_norm group_norm native_group_norm
    scaled_dot_product_attention _scaled_dot_product_flash_attention _scaled_dot_product_flash_attention_for_cpu
    _scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention
    arange zeros ones full empty zeros_like ones_like full_like empty_like scalar_tensor tensor
    tril triu diff
""".split())
# Higher-order ops whose subgraphs are checked with the same rules.
ALLOWED_HIGHER_ORDER = frozenset({"wrap_with_set_grad_enabled", "wrap_with_autocast", "flex_attention"})
ALLOWED_OTHER = frozenset({"_operator.getitem"})

# A serialized program may hold these top-level fields only; the symbolic/guard ones must be empty (static shapes).
PROGRAM_KEYS = {"graph_module", "opset_version", "range_constraints", "schema_version", "verifiers",
                "torch_version", "guards_code"}
INPUT_KINDS = {"parameter", "buffer", "tensor_constant", "user_input"}


class HandoverError(Exception):
    """The model cannot be handed over; the message is one line saying why and what to change."""


def handover_path():
    """Where train.py must hand the model over, or None when no run manager asked for it."""
    value = os.environ.get(HANDOVER_ENV)
    return Path(value) if value else None


def eval_batch_shape(profile_name, seq_len):
    return EVAL_BATCH_ROWS[profile_name], seq_len


# ---------------------------------------------------------------------------
# Trainer side
# ---------------------------------------------------------------------------

class _Logits(torch.nn.Module):
    """The forward the evaluator scores: token ids in, logits out, nothing else."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx)


def _one_line(e):
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text}"[:300]


def export_program(model, shape, vocab_size=None):
    """torch.export of model's logits-only forward at the static shape (B, T), weights included."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    idx = torch.zeros(shape, dtype=torch.long, device=device)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        # Weights kept in bf16 for autocast (train.py's embeddings on CUDA) meet fp32 activations in a graph
        # traced without autocast. The hand-over is the run's last act, so widen them in place: lossless, and
        # the evaluator's own autocast narrows the matmuls again.
        model.float()
    was_training = model.training
    model.eval()
    try:
        # autocast is not part of the hand-over: the evaluator picks the precision. The eager call fills caches
        # the forward builds lazily (masks, rotary tables) with real tensors, so export sees constants; one row
        # is enough (such caches depend on the sequence length) and keeps a gpu-size model's call cheap on a CPU.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            out = model(idx[:1])
            if not torch.is_tensor(out) or out.dim() != 3 or tuple(out.shape[:2]) != (1, shape[1]) or (
                    vocab_size is not None and out.size(-1) != vocab_size):
                got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
                want = (1, shape[1], vocab_size or "vocab")
                raise HandoverError(f"cannot hand the model to the evaluator: model(idx) returned {got}, not logits "
                                    f"{want}; with no targets, forward must return the logits tensor")
            ep = torch.export.export(_Logits(model), (idx,), strict=False)
            if any(isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
                   for n in ep.graph.nodes if n.op == "call_function"):
                # in-place ops: functionalize, so those on intermediates become pure and writes to buffers
                # or the input show in the signature (refused below, by name)
                ep = ep.run_decompositions({})
    except HandoverError:
        raise
    except Exception as e:
        raise HandoverError(f"cannot hand the model to the evaluator: torch.export failed ({_one_line(e)}); make "
                            "forward(idx) traceable: no .item()/.tolist()/numpy, no Python branches on tensor "
                            "values, no writes to buffers or attributes") from None
    finally:
        model.train(was_training)
    return ep


def write_program(ep, path, check=True, extra_ops=()):
    """Writes an ExportedProgram as FORMAT, atomically. check=False only for tests of the evaluator's checks."""
    from torch._export.serde.serialize import serialize
    program = json.loads(serialize(ep).exported_program)
    strip_metadata(program)
    if check:
        check_program(program, extra_ops)
    tensors = {"state_dict": {k: v.detach().contiguous() for k, v in ep.state_dict.items()},
               "constants": {}}
    for name, value in ep.constants.items():
        if not torch.is_tensor(value):
            raise HandoverError(f"cannot hand the model to the evaluator: constant {name} is a "
                                f"{type(value).__name__}, not a tensor; keep only tensors on the model")
        tensors["constants"][name] = value.detach().contiguous()
    weights = io.BytesIO()
    torch.save(tensors, weights)
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            z.writestr("format", FORMAT)
            z.writestr("program.json", json.dumps(program))
            z.writestr("tensors.pt", weights.getvalue())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def export_model(model, path, shape=None, vocab_size=None, extra_ops=()):
    """Called by train.py when training ends: writes the model's forward and weights to path (atomically).
    shape defaults to this profile's evaluation batch (EVAL_BATCH_ROWS, MAX_SEQ_LEN); extra_ops names custom ops
    the evaluator is told to allow (FA3's namespace when it is loaded, see op_allowed). Raises HandoverError
    with a one-line reason when the model cannot be exported. Returns the file's size in bytes."""
    print("phase: exporting", flush=True)
    if shape is None or vocab_size is None:
        from prepare import PROFILE, MAX_SEQ_LEN, VOCAB_SIZE
        shape = shape or eval_batch_shape(PROFILE.name, MAX_SEQ_LEN)
        vocab_size = vocab_size or VOCAB_SIZE
    try:
        from runtime import portable_attention  # the harness's attention: exported as SDPA, see there
    except ImportError:
        from contextlib import nullcontext as portable_attention
    with portable_attention():
        ep = export_program(model, shape, vocab_size)
    _check_signature(ep.graph_signature)
    return write_program(ep, path, extra_ops=extra_ops)


def _check_signature(sig):
    """The trainer-side form of check_program's signature rule, with the names of what was written."""
    written = [name.removeprefix("model.") for name in  # the _Logits wrapper's prefix
               [*sig.buffers_to_mutate.values(), *sig.user_inputs_to_mutate.values()]]
    if written:
        raise HandoverError(f"cannot hand the model to the evaluator: forward writes to {', '.join(written)}; "
                            "the evaluator refuses graphs that change state, so compute it without storing it")


# ---------------------------------------------------------------------------
# Both sides: what a program may contain
# ---------------------------------------------------------------------------

def strip_metadata(program):
    """Drops per-node metadata (stack traces, module paths): torch resolves some of it by name on load."""
    for graph in _graphs(program["graph_module"]["graph"]):
        for node in graph["nodes"]:
            node["metadata"] = {}


def _graphs(graph):
    """graph and every subgraph nested in its nodes' arguments (higher-order ops)."""
    yield graph
    for node in graph.get("nodes", []):
        stack = [node.get("inputs", [])]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                sub = item.get("as_graph")
                if isinstance(sub, dict) and isinstance(sub.get("graph"), dict):
                    yield from _graphs(sub["graph"])
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)


def op_allowed(target, extra_ops=()):
    """target: a serialized op name such as torch.ops.aten.linear.default. extra_ops: further names, or
    namespaces as torch.ops.<namespace>.* (a loaded kernel's custom ops, FA3's for instance)."""
    if target in ALLOWED_OTHER or target in extra_ops:
        return True
    if any(e.endswith(".*") and target.startswith(e[:-1]) for e in extra_ops):
        return True
    parts = target.split(".")
    if parts[:2] != ["torch", "ops"] or len(parts) < 4:
        return False
    namespace, name = parts[2], parts[3]
    if namespace == "higher_order":
        return len(parts) == 4 and name in ALLOWED_HIGHER_ORDER
    overload = parts[4] if len(parts) == 5 else None
    return (namespace == "aten" and len(parts) == 5 and name in ALLOWED_ATEN
            and not (overload or "").startswith("out"))


def _in_place(target):
    parts = target.split(".")
    return len(parts) == 5 and parts[:2] == ["torch", "ops"] and (parts[3].endswith("_") or parts[4].startswith("out"))


def check_program(program, extra_ops=()):
    """Refuses a serialized program (the JSON of torch's export schema) that could run code on load, has
    dynamic shapes, changes state or calls an op outside the allow-list. Raises HandoverError."""
    def refuse(why):
        raise HandoverError(f"the evaluator refuses this graph: {why}")
    if not isinstance(program, dict) or set(program) != PROGRAM_KEYS:
        refuse("it is not a torch.export program of the supported version")
    if program["guards_code"] or program["range_constraints"]:
        refuse("it has shape guards or symbolic shapes; export with static shapes")
    gm = program["graph_module"]
    for graph in _graphs(gm["graph"]):
        for key in ("sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values"):
            if graph.get(key):
                refuse(f"it holds {key.replace('_', ' ')}; export with static shapes and tensors only")
        for value in graph.get("tensor_values", {}).values():
            dims = value.get("sizes", []) + value.get("strides", []) + [value.get("storage_offset", {})]
            if any(set(d) != {"as_int"} for d in dims):
                refuse("a tensor has a symbolic shape; export with static shapes")
        for node in graph["nodes"]:
            target = node.get("target", "")
            if _in_place(target):
                refuse(f"it changes state in place ({target}); forward must not write to buffers, attributes or "
                       "its input")
            if not op_allowed(target, extra_ops):
                refuse(f"it calls {node.get('target')!r}, which is not on the allow-list of pure tensor ops "
                       "(see ALLOWED_ATEN in training/handover.py)")
    sig = gm["signature"]
    kinds = [next(iter(spec)) for spec in sig["input_specs"]]
    if any(k not in INPUT_KINDS for k in kinds) or kinds.count("user_input") != 1:
        refuse(f"its inputs are {sorted(set(kinds))}; it must take exactly one tensor, the token ids")
    outputs = [next(iter(spec)) for spec in sig["output_specs"]]
    if outputs != ["user_output"]:
        refuse(f"it changes state (its outputs are {outputs}: it writes to buffers or its input); forward must "
               "return only the logits")


def load_program(path, device="cpu", extra_ops=()):
    """Reads a FORMAT file back as an ExportedProgram, after check_program. No pickle beyond plain tensors."""
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch._export.serde.schema import ExportedProgram
    try:
        with zipfile.ZipFile(path) as z:
            if z.read("format").decode() != FORMAT:
                raise HandoverError(f"{path} is not a {FORMAT} file")
            program = json.loads(z.read("program.json"))
            weights = z.read("tensors.pt")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise HandoverError(f"cannot read the handed-over model {path}: {_one_line(e)}") from None
    strip_metadata(program)
    check_program(program, extra_ops)
    try:
        tensors = torch.load(io.BytesIO(weights), map_location=device, weights_only=True)
        state_dict, constants = tensors["state_dict"], tensors["constants"]
        if not all(torch.is_tensor(t) for t in [*state_dict.values(), *constants.values()]):
            raise ValueError("non-tensor weights")
        parameters = {spec["parameter"]["parameter_name"] for spec in program["graph_module"]["signature"]
                      ["input_specs"] if "parameter" in spec}
        state_dict = {k: torch.nn.Parameter(v, requires_grad=False) if k in parameters else v
                      for k, v in state_dict.items()}
        ep = ExportedProgramDeserializer().deserialize(_dict_to_dataclass(ExportedProgram, program),
                                                       state_dict, constants)
    except Exception as e:
        raise HandoverError(f"cannot load the handed-over model: {_one_line(e)}") from None
    sig = ep.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate or len(sig.user_inputs) != 1:
        raise HandoverError("the evaluator refuses this graph: it changes state")
    for module in ep.graph_module.modules():
        for node in module.graph.nodes:
            if node.op == "call_function" and not op_allowed(_target_name(node.target), extra_ops):
                raise HandoverError(f"the evaluator refuses this graph: it calls {_target_name(node.target)!r}")
    _drop_dtype_asserts(ep)
    return ep


def _drop_dtype_asserts(ep):
    """export records the dtype it saw before each .to(); under the evaluator's autocast (bf16 on CUDA) those
    dtypes differ and the asserts would fail. They compute nothing, so they go."""
    assert_op = torch.ops.aten._assert_tensor_metadata.default
    for module in ep.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        dropped = False
        for node in list(module.graph.nodes):
            if node.op == "call_function" and node.target is assert_op and not node.users:
                module.graph.erase_node(node)
                dropped = True
        if dropped:
            module.recompile()


def _target_name(target):
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        if isinstance(target, torch._ops.HigherOrderOperator):
            return f"torch.ops.higher_order.{target.name()}"
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}"
