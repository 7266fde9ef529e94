# Trains in seconds on a CPU: for tests and for trying out changes to the code.
out_dir = "out-tiny"
batch_size = 8
block_size = 32
n_layer = 2
n_head = 2
n_embd = 32
max_iters = 50
warmup_iters = 5
eval_interval = 25
eval_iters = 4
log_interval = 10
learning_rate = 3e-3
dtype = "float32"  # matmuls this small gain nothing from bfloat16; float32 is the same on every CPU
