# 512-dimensional, 12 layers (about 40M parameters with the full GPT-2 vocabulary). For a GPU.
out_dir = "out-large"
batch_size = 64
block_size = 512
n_layer = 12
n_head = 8
n_embd = 512
dropout = 0.1
max_iters = 10000
warmup_iters = 500
learning_rate = 3e-4
min_lr = 3e-5
eval_interval = 500
eval_iters = 50
log_interval = 50
