# Runs INSIDE the sandbox (CPython on WASI), once per interpreter, before the first cell.
#
# The host runs this file as the module `_rlm_driver`, in a namespace of its own with a private
# copy of the builtins taken before any user code ran, so names a cell binds or rebinds, in its
# globals or in `builtins` (`len`, `print`, ...), never change what the driver does. It defines
# the guest API the model's code sees and `cell(plan, code)`, which the host calls each turn with
# both inline. The cell's report (error, answer, locals) ends stderr after a marker the host chose.
# Bulk data goes through the /rlm mount:
#   in:  state.in (the pickle to restore), context.in and context_<i>.in (the contexts)
#   out: state.out (a new pickle over 64 KB; a smaller one rides in the report when it changed),
#        meta.json (the report, when the host asks for it again after stderr overflowed)
# Compression and hashing happen on the host, in native code, many times faster than here.
# Nothing here is trusted by the host: a cell can reach all of it. The host measures every size
# it acts on, validates the report, treats a missing or doubled one as a failed cell, and never
# unpickles state.

import ast
import base64
import contextlib
import json
import os
import reprlib
import sys
import traceback

import cloudpickle
from host import tools

MOUNT = "/rlm"
CELL_FILE = "<cell>"
INLINE_STATE = 64 << 10  # a smaller state travels in the report, not as a file
# A tool request frame is capped at 1 MiB: a batch of more than this many characters (JSON-
# escaped, it stays under the cap) goes through the mount as bytes instead.
FRAME_CHARS = 100_000
READ_BYTES = 1 << 20  # a mounted file is read this much at a time

main = sys.modules["__main__"].__dict__
# Taken now, before any cell: a cell that replaces sys.__stderr__, os.write, os.fstat or
# cloudpickle's functions changes only its own view of them.
write_fd, fstat = os.write, os.fstat
pickle_dump = cloudpickle.dump
pickle_loads = cloudpickle.loads
json_dumps, json_loads = json.dumps, json.loads
stdout, stderr = sys.stdout, sys.stderr
# A cell stopped by its deadline or fuel keeps the lines it printed before: a full buffer dies
# with the guest. Costs a host write a line (~40 us).
sys.stdout.reconfigure(line_buffering=True)


class SubcallError(RuntimeError):
    """A sub-call failed: no callback, a refused token, the per-cell cap, or the model."""


SubcallError.__qualname__ = SubcallError.__name__
SubcallError.__module__ = "builtins"


class ToolError(RuntimeError):
    """A custom tool call failed: no such tool, bad arguments, or the tool's own error."""


ToolError.__qualname__ = ToolError.__name__
ToolError.__module__ = "builtins"

tool_names = set()  # the caller's tools, defined anew each cell; never pickled
limits = {"batch_bytes": 0}  # the host's, for the cell running
bound = set()  # context_0, context_1, ...: bound by the host each cell, never pickled


def _make_tool(name, doc):
    def call(*args, **kwargs):
        try:
            args, kwargs = json_loads(json_dumps([list(args), kwargs]))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name}: arguments must be JSON values ({e})") from None
        try:
            return tools.call_tool(name=name, args=args, kwargs=kwargs)
        except Exception as e:
            raise ToolError(str(e)) from None

    call.__name__ = call.__qualname__ = name
    call.__doc__ = doc
    return call


def _subcall(kind, prompts, model):
    prompts = [p if isinstance(p, str) else str(p) for p in prompts]
    if not prompts:
        return []
    if model is not None and not isinstance(model, str):
        raise TypeError("model must be a str or None")
    try:
        if sum(len(p) + 4 for p in prompts) <= FRAME_CHARS:  # escaped, within one frame
            return tools.subcall(kind=kind, prompts=prompts, model=model)
        lengths = _write_batch(prompts)
        return tools.subcall(kind=kind, prompts=[], model=model, batch=lengths)
    except Exception as e:
        raise SubcallError(str(e)) from None


def _write_batch(prompts):
    """A large batch goes to the host in one file, its prompts' UTF-8 one after another; their
    byte lengths go with the call. Stopped at the host's cap, before more is written."""
    cap = limits["batch_bytes"]
    lengths, total = [], 0
    with open(f"{MOUNT}/batch.out", "wb") as f:
        for index, prompt in enumerate(prompts):
            try:
                data = prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt {index} is not text ({e.reason} at {e.start})") from None
            total += len(data)
            if total > cap:
                raise ValueError(
                    f"sub-call batch is over {cap:,} bytes (EXECUTE_MAX_BATCH_MB): "
                    "send it in smaller batches"
                )
            f.write(data)
            lengths.append(len(data))
    return lengths


def llm_query(prompt, model=None):
    """Ask a sub-model one question; returns its reply as a str."""
    return _subcall("llm", [prompt], model)[0]


def llm_query_batched(prompts, model=None):
    """Ask a sub-model many questions at once (concurrently); returns replies in order."""
    return _subcall("llm", list(prompts), model)


def rlm_query(prompt, model=None):
    """Run a child RLM (its own REPL) on a sub-problem; returns its final answer."""
    return _subcall("rlm", [prompt], model)[0]


def rlm_query_batched(prompts, model=None):
    """Run several child RLMs concurrently; returns their answers in order."""
    return _subcall("rlm", list(prompts), model)


def _kept(name):
    """Whether the state keeps `name` of the user's globals: not the API, a tool, a context
    (`context`, `context_0`, ...: the host binds them again each cell) or a dunder."""
    return not (
        name in RESERVED
        or name in tool_names
        or name in bound
        or name == "context"
        or name.startswith("__")
    )


def _user_names():
    """What SHOW_VARS lists and the report previews: the kept names, less `answer` and `_x`."""
    return [name for name in main if _kept(name) and name != "answer" and name[0] != "_"]


# Bounded repr: a preview of a 10 MB list must not build a 10 MB string every cell.
short = reprlib.Repr(maxlevel=2, maxdict=4, maxlist=6, maxtuple=6, maxset=6,
                     maxstring=120, maxlong=40, maxother=120)  # fmt: skip


def _preview(value, limit=120):
    try:
        text = short.repr(value)
    except Exception as e:
        text = f"<unrepresentable: {type(e).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    size = ""
    try:
        if hasattr(value, "__len__") and not isinstance(value, type):
            size = f" (len {len(value)})"
    except Exception:
        pass
    return text + size


def SHOW_VARS():
    """Print the variables you have made in the REPL, with their types."""
    names = _user_names()
    if not names:
        print("No variables yet.")
    for name in sorted(names):
        value = main[name]
        print(f"{name}: {type(value).__name__} = {_preview(value, 80)}")


def _answer_dict():
    answer = main.get("answer")
    if not isinstance(answer, dict):
        answer = main["answer"] = {"content": None, "ready": False}
    return answer


def FINAL_VAR(name):
    """Make the value of variable `name` (a str of the name, or the value) the final answer."""
    if isinstance(name, str) and name.strip().strip("'\"") in main:
        value = main[name.strip().strip("'\"")]
    elif isinstance(name, str):
        raise NameError(f"FINAL_VAR: no variable named {name!r}; SHOW_VARS() lists them")
    else:
        value = name
    answer = _answer_dict()
    answer["content"] = value  # a value other than text is reported as its JSON
    answer["ready"] = True
    return answer["content"]


def FINAL(text):
    """Make `text` the final answer."""
    answer = _answer_dict()
    answer["content"] = str(text)
    answer["ready"] = True
    return answer["content"]


API = {
    "llm_query": llm_query,
    "llm_query_batched": llm_query_batched,
    "rlm_query": rlm_query,
    "rlm_query_batched": rlm_query_batched,
    "SHOW_VARS": SHOW_VARS,
    "FINAL_VAR": FINAL_VAR,
    "FINAL": FINAL,
    "SubcallError": SubcallError,
    "ToolError": ToolError,
}
RESERVED = set(API)
original_context = []  # [the value the host bound to `context`], once it bound one


def _restore_scaffold():
    """Put back the guest API, `answer` and `context` if the cell rebound or deleted them,
    with one stderr line naming them: a model that wrote `context = context.split()` keeps its
    input for the next cell."""
    rebound = [name for name, value in API.items() if main.get(name) is not value]
    for name in rebound:
        main[name] = API[name]
    kept = original_context and "context" in main and main["context"] is original_context[0]
    if original_context and not kept:
        main["context"] = original_context[0]
        rebound.append("context")
    if type(main.get("answer")) is not dict:
        main["answer"] = {"content": None, "ready": False}
        rebound.append("answer")
    if rebound:  # on the stream the driver holds: the cell may have replaced sys.stderr
        _say(
            f"[rlm] this cell rebound {', '.join(rebound)}; restored. Keep your own values "
            'under other names (and answer with answer["content"] = ...).\n'
        )


def _say(line):
    """A line on the stderr the driver took at start."""
    with contextlib.suppress(Exception):
        stderr.write(line)


def _read(name):
    """A mounted file's bytes, read in pieces: the host copies each read whole on its way in."""
    with open(f"{MOUNT}/{name}", "rb", buffering=0) as f:
        data = bytearray(fstat(f.fileno()).st_size)
        view, at = memoryview(data), 0
        while at < len(data):
            got = f.readinto(view[at : at + READ_BYTES])
            if not got:
                break
            at += got
    del view
    return data


def _write(name, data):
    with open(f"{MOUNT}/{name}", "wb") as f:
        f.write(data)


def _run_user_code(code):
    """Run the cell like an interactive prompt: a final expression's value is printed."""
    tree = ast.parse(code, CELL_FILE, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, CELL_FILE, "exec"), main)
    if last is not None:
        value = eval(compile(last, CELL_FILE, "eval"), main)
        if value is not None:
            print(repr(value))


def _error_info(exc):
    """The exception as the user should see it: their frames only, no driver frames."""
    if isinstance(exc, SyntaxError):
        text = "".join(traceback.format_exception_only(type(exc), exc))
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        while frames and frames[0].filename != CELL_FILE:
            frames.pop(0)
        frames = [f for f in frames if f.filename != "<rlm>"]
        text = (
            "Traceback (most recent call last):\n"
            + "".join(traceback.format_list(frames))
            + "".join(traceback.format_exception_only(type(exc), exc))
        )
    return {"type": type(exc).__name__, "message": _text(exc), "traceback": text}


def _text(value):
    try:
        return str(value)
    except Exception as e:
        return f"<str() failed: {type(e).__name__}>"


def _answer():
    """`answer` as the host reads it; read with dict's own methods, so a dict subclass, or a
    content whose str() raises, is no answer rather than the end of the driver."""
    answer = main.get("answer")
    if not isinstance(answer, dict):
        return None
    try:
        content = dict.get(answer, "content")
        if content is not None and not isinstance(content, str):
            content = _as_text(content)
        return {"ready": bool(dict.get(answer, "ready")), "content": content}
    except BaseException as e:
        _say(f"[rlm] answer cannot be read ({type(e).__name__}): no answer\n")
        return None


def _as_text(value):
    """A value set as the answer: its JSON when it has one (a typed answer is read back from
    it), else its str()."""
    try:
        return json_dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return str(value)


class _Oversize(Exception):
    """The pickle passed the size the host keeps eagerly."""


class _CappedWriter:
    """A pickle's bytes, collected up to `limit` (None: no limit)."""

    def __init__(self, limit):
        self.parts, self.size, self.limit = [], 0, limit

    def write(self, data):
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            raise _Oversize
        self.parts.append(bytes(data))
        return len(data)


def _pickle(value, limit):
    out = _CappedWriter(limit)
    pickle_dump(value, out, protocol=5)
    return b"".join(out.parts)


def _snapshot(limit):
    """Pickle the user's variables; values that cannot be pickled are dropped and named. None
    (and nothing dropped) when the pickle would pass `limit` bytes: such a state is kept only
    by the live interpreter, and rebuilt elsewhere by replay, so it is not pickled at all."""
    space = {n: main[n] for n in list(main) if _kept(n)}
    try:
        return _pickle(space, limit), []
    except _Oversize:
        return None, []
    except Exception:
        pass
    dropped = []
    for name in list(space):
        try:
            _pickle(space[name], limit)
        except _Oversize:
            return None, []
        except Exception as e:
            dropped.append(name)
            _say(
                f"[state] variable {name!r} ({type(space[name]).__name__}) cannot be pickled "
                f"({type(e).__name__}); it will not survive a restore on another pod\n"
            )
            del space[name]
    try:
        return _pickle(space, limit), dropped
    except _Oversize:
        return None, []


def _bind_contexts(plan):
    """A conversation's contexts; "alias" is the value just bound to `context`."""
    if "context_count" not in plan:
        return
    for name in [n for n in bound if int(n[8:]) >= plan["context_count"]]:
        bound.discard(name)
        main.pop(name, None)
    for index, kind in plan["contexts"]:
        name = f"context_{index}"
        if kind == "alias":
            main[name] = main.get("context")
        else:
            data = _read(f"{name}.in")
            main[name] = data.decode("utf-8") if kind == "text" else json_loads(data)
        bound.add(name)


# The last small state the host holds, to skip re-sending it unchanged. A larger one is always
# handed over: comparing bytes here is a byte loop (35 ms per 10 MB), while the host hashes it
# natively anyway and knows an unchanged one by its ref.
last = {"meta": "{}", "blob": None}


def cell(plan, code):
    last["meta"] = "{}"  # until this cell's report is made, none can be read back
    plan = json_loads(plan)
    limits["batch_bytes"] = plan.get("batch_bytes", 0)
    meta = {"error": None, "answer": None, "locals": {}, "dropped": []}
    try:
        if plan.get("restore"):
            blob = _read("state.in")
            main.update(pickle_loads(blob))
            last["blob"] = blob if len(blob) <= INLINE_STATE else None
        if plan.get("context") == "text":
            main["context"] = _read("context.in").decode("utf-8")
        elif plan.get("context") == "json":
            main["context"] = json_loads(_read("context.in"))
        if plan.get("context"):
            original_context[:] = [main["context"]]
        _bind_contexts(plan)
        if plan.get("vars"):
            main.update(plan["vars"])
        for name, doc in (plan.get("tools") or {}).items():
            main[name] = _make_tool(name, doc)
            tool_names.add(name)
    except BaseException as e:
        info = _error_info(e)
        info["message"] = f"could not load the inputs: {info['message']}"
        meta["error"] = info
        meta["load_failed"] = True
        _report(plan, meta)
        return
    main.setdefault("answer", {"content": None, "ready": False})
    try:
        _run_user_code(code)
    except BaseException as e:
        info = _error_info(e)
        meta["error"] = info
        _say(info["traceback"])
    try:
        _describe(plan, meta)
    except BaseException as e:  # a value's repr or pickling raised past its guards
        meta = {"driver_error": f"{type(e).__name__}: {_text(e)[:300]}"}
    _report(plan, meta)


def _describe(plan, meta):
    """The cell's answer, variables and state into `meta` (the state as a file, or inline)."""
    meta["answer"] = _answer()
    _restore_scaffold()
    meta["locals"] = {
        n: {"type": type(main[n]).__name__, "preview": _preview(main[n])}
        for n in _user_names()[:200]
    }
    if plan.get("snapshot"):
        blob, meta["dropped"] = _snapshot(plan.get("state_limit"))
        if blob is None:
            meta["state_live"] = True
            last["blob"] = None
        elif len(blob) > INLINE_STATE:
            try:
                _write("state.out", blob)
            except OSError as e:
                meta["state_error"] = (
                    f"it is {len(blob):,} bytes, over the pod's cap (EXECUTE_MAX_STATE_MB, {e}): "
                    "keep less in variables"
                )
            last["blob"] = None
        elif blob != last["blob"] or plan.get("force_state", False):
            # A small state travels in the report: a file in the mount costs ~1 ms.
            meta["state_inline"] = base64.b64encode(blob).decode("ascii")
            last["blob"] = blob


def _report(plan, meta):
    """The cell's report goes last on stderr, after a marker the host chose."""
    last["meta"] = json_dumps(meta)
    for stream in (sys.stdout, sys.stderr, stdout, stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    write_all(2, (plan["marker"] + last["meta"]).encode())


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[write_fd(fd, view) :]


def report_to_file():
    """When stderr overflowed and cut the report, the host asks for it as a file."""
    _write("meta.json", last["meta"].encode())


main.update(API)
main["answer"] = {"content": None, "ready": False}
