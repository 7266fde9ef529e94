"""
The optimizers train.py steps: AdamW (weight decay on matrices only), or Muon for the
blocks' matrices beside AdamW for the rest.
"""

import torch


def configure_optimizers(model, learning_rate, weight_decay, betas, kind="adamw"):
    """
    The optimizers that train model, as a list (train.py steps each one).
    'adamw': AdamW with weight decay on matrices (Linear weights, embeddings) only:
    decaying biases and norm gains just pulls them away from their useful values.
    'muon': Muon (Jordan et al. 2024) for the blocks' 2-D weight matrices: it replaces
    each matrix's momentum by the nearest orthogonal matrix (Newton-Schulz iterations),
    so every direction of the matrix learns at the same rate. The embedding, the output
    layer tied to it, biases and gains stay with AdamW, as Muon's authors advise.
    match_rms_adamw scales Muon's step so the same learning rate suits both (Liu et al. 2025).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if kind == "muon" and p.dim() == 2 and name.startswith("blocks.")]
    with_muon = {id(p) for p in hidden}
    groups = [
        {
            "params": [p for _, p in named if p.dim() >= 2 and id(p) not in with_muon],
            "weight_decay": weight_decay,
        },
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:  # fused: one kernel for all parameters, where this torch has it for the device
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)]
    except (RuntimeError, TypeError):
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=True)]
    if hidden:
        muon = torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        optimizers.append(muon)
    return optimizers
