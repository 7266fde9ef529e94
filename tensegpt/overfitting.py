"""
What train.py says about the data against the model (docs/training.md, "Your own text"):
before the first step, how many tokens the data has against the model's parameters and how
many passes over it the planned steps make; during the run, once, when validation loss has
not beaten its best for NOTICE_AFTER evaluations while training loss went on falling (the
model memorising its training text), with the remedies; and with --early_stop=N, the stop
after N evaluations without a better val loss (the patience of Keras' and Lightning's
EarlyStopping).
"""

NOTICE_AFTER = 3  # evaluations without a better val loss before the run says it is memorising
MANY_EPOCHS = 10  # passes over the training tokens past which the plan line warns


def data_budget(train_tokens, n_params, config):
    """The line before the first step: the training tokens, per parameter, and the epochs the plan makes."""
    per_step = config["batch_size"] * config["block_size"] * config["grad_accum"]
    epochs = config["max_iters"] * per_step / max(1, train_tokens)
    line = (
        f"data: {train_tokens:,} training tokens for {n_params / 1e6:.2f}M parameters "
        f"({train_tokens / n_params:.2g} per parameter); {config['max_iters']:,} steps x {per_step:,} tokens "
        f"read them {epochs:.1f} times"
    )
    if epochs >= MANY_EPOCHS:
        line += (
            " (after this many passes a model tends to memorise its text: watch val loss, and see "
            "docs/training.md, 'Your own text')"
        )
    return line


class Overfitting:
    """Evaluations since the best val loss; after() says what to tell, stop() whether --early_stop has come."""

    def __init__(self, early_stop, best_path):
        self.early_stop, self.best_path = early_stop, best_path
        # the best evaluation (iteration, val loss, train loss), evaluations since, and whether the run was told
        self.best, self.since_best, self.told = None, 0, False

    def state(self):
        return {"best": self.best, "since_best": self.since_best, "told": self.told}

    def restore(self, saved):
        # a checkpoint from before the watch was kept starts it afresh
        if saved:
            self.best, self.since_best, self.told = saved["best"], saved["since_best"], saved["told"]

    def after(self, iter_num, losses, improved):
        """The lines to say after an evaluation (losses: its train and val) that did or did not improve."""
        if improved or self.best is None:
            self.best, self.since_best = [iter_num, losses["val"], losses["train"]], 0
            return []
        self.since_best += 1
        best_iter, best_val, best_train = self.best
        lines = []
        if self.since_best >= NOTICE_AFTER and losses["train"] < best_train and not self.told:
            self.told = True
            lines.append(
                f"val loss has not beaten its best ({best_val:.4f} at iteration {best_iter}) for {self.since_best} "
                f"evaluations while train loss fell from {best_train:.4f} to {losses['train']:.4f}: the model is "
                f"memorising its training text. {self.best_path} keeps the best model; remedies: more data, dropout "
                f"(--dropout=0.1), a smaller model (--n_layer, --n_embd), fewer steps (--max_iters={best_iter}), or "
                f"--early_stop={NOTICE_AFTER} to stop at this point"
            )
        if self.stop():
            lines.append(
                f"early stop: {self.since_best} evaluations without a better val loss than {best_val:.4f} "
                f"(iteration {best_iter}), --early_stop={self.early_stop}"
            )
        return lines

    def stop(self):
        return bool(self.early_stop) and self.since_best >= self.early_stop
