# The seed design: d_model 256, 8 heads, 6 layers, d_ff 1024, context 512. For a GPU.
out_dir = "out-medium"
batch_size = 64
block_size = 512
n_layer = 6
n_head = 8
n_embd = 256
d_ff = 1024
dropout = 0.1
max_iters = 5000
warmup_iters = 200
learning_rate = 6e-4
min_lr = 6e-5
eval_interval = 500
eval_iters = 50
log_interval = 50
