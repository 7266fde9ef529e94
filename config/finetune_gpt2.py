# LoRA fine-tuning of GPT-2 124M (downloaded once from the Hugging Face hub) on your own text,
# on a laptop CPU (nanoGPT's Shakespeare fine-tune, without a GPU; docs/chat.md):
#   python prepare.py --input=my.txt --full_vocab=True --out_dir=data-my
#   python train.py config/finetune_gpt2.py --data_dir=data-my
# GPT-2's weights stay frozen; rank-8 adapters on every block's matrices train (about 1% of
# the parameters), so the optimizer state is small and each step's backward is cheaper.
init_from = "gpt2"
out_dir = "out-gpt2-lora"
lora_rank = 8
lora_alpha = 16.0
block_size = 256
batch_size = 4
grad_accum = 4
max_iters = 300
warmup_iters = 20
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 50
eval_iters = 10
log_interval = 10
