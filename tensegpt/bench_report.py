"""bench.py's report as tables: one function per section, in the order bench.py measures them."""

from tensegpt.decode_bench import print_decoding


def print_report(report, opts):
    print(
        f"device {report['device']}, {report['dtype']}, torch {report['torch']}, {report['threads']} threads, "
        f"{opts['config']}"
    )
    peak = report["matmul_peak_gflops"]
    gflops = f"float32 {peak['float32']:8.1f} GFLOP/s   bfloat16 {peak['bfloat16']:8.1f} GFLOP/s"
    print(f"{'matmul peak (torch.mm)':34} {gflops}")
    print_training(report)
    print_generation(report["generation"])
    print_training_shapes(report)
    print_decoding(report)
    if "prepare" in report:
        p = report["prepare"]
        print(
            f"{'prepare':34} {p['megabytes']:.0f} MB in {p['seconds']:.1f} s: "
            f"{p['mb_per_sec']:.1f} MB/s, peak memory {p['peak_memory_mb']:.0f} MB, {p['threads']} threads"
        )
    if "heldout" in report:
        print_heldout(report["heldout"], opts)
    if "switches" in report:
        print_switches(report["switches"], opts)


def print_training(report):
    """Training with the compact vocabulary, GPT-2's full one, and the full one without the chunked loss."""
    runs = (report["train_compact"], report["train_full"], report["train_full_plain_loss"])

    def row(label, cells, ratio="", after=""):
        print(f"{label:34} {cells[0]:>16} {cells[1]:>16} {ratio:>8} {cells[2]:>17}{after}")

    def each(key, spec):
        return [format(run[key], spec) for run in runs]

    row("training", ["compact vocab", "full vocab", "full, plain loss"], "ratio")
    row("  vocab rows", each("vocab_size", ","))
    row("  parameters (M)", each("params_M", ".2f"))
    row("  ms/iter (median)", each("ms_per_iter", ".1f"))
    row("  tokens/s", each("tokens_per_sec", ",.0f"), f"{report['train_speedup']:.1f}x")
    row("  MFU (of the measured peak)", [f"{100 * run['mfu']:.1f}%" for run in runs])
    if runs[0]["peak_memory_mb"] is not None:
        row("  peak resident memory (MB)", each("peak_memory_mb", ",.0f"))
    chunked = f"   chunked is {report['chunked_loss_speedup']:.2f}x the plain loss"
    row("  chunked loss (full vocab)", ["on" if runs[0]["chunked_loss"] else "off", "on", "off"], after=chunked)


def print_generation(gen):
    """Generation with the KV cache against full recompute, per position, and sampled per vocabulary."""
    print(f"{'generation':34} {'KV cache':>16} {'full recompute':>16} {'ratio':>8}")
    label = f"  tokens/s ({gen['new_tokens']} new, block {gen['block_size']})"
    cached, recomputed = gen["kv_cache_tokens_per_sec"], gen["full_recompute_tokens_per_sec"]
    print(f"{label:34} {cached:>16,.0f} {recomputed:>16,.0f} {gen['speedup']:>7.1f}x")
    if "ratio_500_to_50" in gen:
        at_50, at_500 = gen["ms_per_token_at_50"], gen["ms_per_token_at_500"]
        print(f"{'  ms/token at position 50, 500':34} {at_50:>16.2f} {at_500:>16.2f} {gen['ratio_500_to_50']:>7.2f}x")
    sampled = gen["sampled_tokens_per_sec"]
    print(f"{'  sampled tokens/s, T=0.8':34} {'compact vocab':>16} {'full vocab':>16}")
    ratio = sampled["compact"] / sampled["full"]
    print(f"{'':34} {sampled['compact']:>16,.0f} {sampled['full']:>16,.0f} {ratio:>7.2f}x")


def print_training_shapes(report):
    """One full-vocabulary training step at each shape: the model's own loss, the plain one, transformers."""
    for shape, step in report.get("training_shapes", {}).items():
        ms = {kind: step[kind]["ms_per_iter"] for kind in ("train.py", "plain", "transformers")}
        print(
            f"{'training step, ' + shape + ' shape':34} own {ms['train.py']:7.1f} ms   plain {ms['plain']:7.1f} ms  "
            f" transformers {ms['transformers']:7.1f} ms   (train.py uses {step['train_py_uses']})"
        )


def print_heldout(heldout, opts):
    print(f"held-out quality: last 10% of {opts['heldout']}, {opts['quality_steps']} steps of {opts['config']}")
    print(f"{'':34} {'bits per byte':>16} {'vocab':>8} {'train time':>11}")
    for name, q in heldout.items():
        if name != "text":
            print(f"{'  ' + name:34} {q['bits_per_byte']:>16.3f} {q['vocab_size']:>8,} {q['train_seconds']:>10.0f}s")


def print_switches(switches, opts):
    """Each modern-block switch on tense.txt (and on held-out prose with --heldout)."""
    steps = opts["switch_steps"]
    first = next(iter(switches.values()))
    print(
        f"modern-block switches: {steps} steps of {opts['config']} on {opts['input']} (best val loss in N steps, "
        f"and in the {first['tense']['same_seconds']:.0f} s of training the fastest needs for them)"
    )
    columns = ("params M", "KV MB", "tok/s", "best val", "same time", "bits/B", "gramm.", "agree", "who-what", "probe")
    widths = (8, 6, 7, 8, 9, 7, 7, 6, 8, 6)
    print(f"{'':24} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    pct = lambda row, key: f"{100 * row[key]:.1f}%" if key in row else "-"
    for name, r in switches.items():
        t = r["tense"]
        cells = (
            f"{r['params_M']:.3f}",
            f"{r['kv_cache_mb']:.2f}",
            f"{t['tokens_per_sec']:,.0f}",
            f"{t['val_loss']:.4f}",
            f"{t['val_loss_same_seconds']:.4f}",
            f"{t['bits_per_byte']:.4f}",
            *(pct(t, key) for key in ("grammatical", "tense_agreement", "semantic_errors", "probe_accuracy")),
        )
        print(f"{name:24} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    if "prose" in first:
        print(
            f"held-out prose: {steps} steps on the first 90% of {opts['heldout']}, scored on the last 10% "
            f"(best val loss in N steps and in {first['prose']['same_seconds']:.0f} s)"
        )
        print(f"{'':24} {'tok/s':>7} {'best val':>8} {'same time':>9} {'bits/B':>7}")
        for name, r in switches.items():
            p = r["prose"]
            print(
                f"{name:24} {p['tokens_per_sec']:>7,.0f} {p['val_loss']:>8.4f} {p['val_loss_same_seconds']:>9.4f} "
                f"{p['bits_per_byte']:>7.4f}"
            )
