# GPT-2 small (124M parameters): exactly GPT-2's architecture, so a checkpoint trained with
# it exports to Hugging Face (export.py), and GPT-2's own weights fine-tune with it:
#   python prepare.py --input=my.txt --full_vocab=True
#   python train.py config/gpt2.py --init_from=hf:path/to/gpt2
# For a GPU.
out_dir = "out-gpt2"
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
d_ff = 3072
bias = True
pos_encoding = "learned"
activation = "gelu"
dropout = 0.0
batch_size = 8
grad_accum = 8
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 5000
warmup_iters = 200
eval_interval = 250
eval_iters = 50
log_interval = 10
