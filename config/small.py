# The default experience: tense.txt's sentences, right as eval.py counts them, in about three minutes
# on a 2-core laptop CPU (docs/training.md has the measurements that chose each setting).
out_dir = "out"
batch_size = 16  # at equal tokens, twice the steps of 32 made fewer wrong sentences
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
# today's block (docs/modern-block.md): what it buys at this size is fewer wrong sentences per second
pos_encoding = "rotary"
norm = "rmsnorm"
activation = "swiglu"
n_kv_head = 2
qk_norm = True
optimizer = "muon"
max_iters = 2500
warmup_iters = 100
learning_rate = 3e-3
min_lr = 1e-4
# compiled (block by block, attention written out, the output layer with its loss), and Muon's matrices
# orthogonalised layer-stacked, a step takes about half the time: 2,500 steps where 1,400 fitted
compile = True
attention = "explicit"  # written out: what torch.compile fuses best on a CPU (docs/training.md)
eval_interval = 500
eval_iters = 20
log_interval = 50
