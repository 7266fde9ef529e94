"""
torch.compile from outside the model (nn.Module.compile), for training and for serving: the model's own code
is never rebound, so a fork's edit is what compiles.
"""

import logging
import time

import torch


def compile_now(model, config, vocab_size, device, autocast, say):
    """
    --compile in one process: torch.compile compiles at a module's first call, so that call is made here, a forward
    and backward pass on random tokens of a batch's shape. Where it cannot compile (on a CPU, Inductor needs a C++
    compiler) the run says so in one line and trains uncompiled, rather than failing at its first step. Returns
    whether the model is compiled; the seconds it took go to say.
    """
    start = time.perf_counter()
    # its own random draws: these tokens and dropout here must not shift the training run's
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.startswith("cuda") else []):
        # inputs and targets two tensors, as a batch's are: the compiled graph is specialised to that
        idx, targets = torch.randint(vocab_size, (2, config["batch_size"], config["block_size"])).to(device)
        try:
            with autocast:
                _, loss = model(idx, targets)
            loss.backward()
        except Exception as e:
            # dynamo wraps what failed (a missing compiler, say): name that
            while (inner := e.__cause__ or getattr(e, "inner_exception", None)) is not None:
                e = inner
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            say(f"note: torch.compile failed here ({e.__class__.__name__}: {first_line}); training uncompiled")
            # back to eager: what nn.Module.compile() set on each compiled module, unset
            for module in model.modules():
                module._compiled_call_impl = None
            return False
        finally:
            model.zero_grad(set_to_none=True)
    say(f"compiled in {time.perf_counter() - start:.0f}s")
    return True


def compile_for_serving(model):
    """
    torch.compile the model for the serving engine: one graph for every batch and length (dynamic shapes). It breaks
    where forward reads the longest position back to check it against the context (.item()), as it must; dynamo's
    warning about that break would only alarm, so it is silenced.
    """
    logging.getLogger("torch._dynamo.variables.tensor").setLevel(logging.ERROR)
    model.compile(dynamic=True)
