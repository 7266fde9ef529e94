# The quick start before today's block: GPT-2's block, AdamW, batches of 32 (docs/training.md compares them).
#     python train.py config/small_gpt2_block.py
out_dir = "out-gpt2-block"
batch_size = 32
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
max_iters = 1200
warmup_iters = 100
# 2e-3 rather than 1e-3: docs/eval.md has the two measured side by side
learning_rate = 2e-3
min_lr = 1e-4
eval_interval = 200
eval_iters = 20
log_interval = 50
