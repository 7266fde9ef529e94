# Today's block in place of GPT-2's, every switch on. Apply it after a size:
#     python train.py config/small.py config/modern.py
# What each switch buys at this size is measured in the README ("From GPT-2 to today's block").
out_dir = "out-modern"
pos_encoding = "rotary"  # rotary position embeddings (Su et al. 2021), no learned position table
norm = "rmsnorm"  # RMSNorm (Zhang & Sennrich 2019)
activation = "swiglu"  # SwiGLU (Shazeer 2020), hidden size 8/3 * n_embd
n_kv_head = 2  # grouped-query attention (Ainslie et al. 2023): 2 key/value heads for the 4 query heads of small.py
qk_norm = True  # queries and keys RMS-normalised per head
optimizer = "muon"  # Muon for the blocks' matrices, AdamW for embeddings and gains
