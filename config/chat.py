# Chat fine-tuning: config/small.py's model (the quick start's out/trained.pth) taught to follow
# the tense instructions of make_tense.py --task=chat (docs/chat.md):
#   python make_tense.py --task=chat
#   python prepare.py --input=tense_chat.jsonl --val_input=tense_chat_val.jsonl \
#       --vocab_from=out/trained.pth --out_dir=data-chat
#   python train.py config/chat.py
# A fresh optimizer and schedule on the checkpoint's weights; the loss counts the answers only.
init_from = "out/trained.pth"
data_dir = "data-chat"
out_dir = "out-chat"
chat = True
batch_size = 32
block_size = 128
max_iters = 800
warmup_iters = 30
learning_rate = 3e-3  # higher than pretraining: 1e-3 and 2e-3 are compared in docs/chat.md
min_lr = 1e-4
eval_interval = 400
eval_iters = 20
log_interval = 50
attention = "explicit"  # written out: faster than the fused kernel on a CPU at this size (docs/training.md)
