# Your own text (a book of a few hundred thousand tokens), on top of a model's size:
#   python train.py config/small.py config/own_text.py --data_dir=data/my
# dropout, because a text this small is learned by heart otherwise, and a stop where val loss stops
# improving (docs/training.md, "Your own text", has the measurements that chose them)
dropout = 0.2
eval_interval = 100
early_stop = 4
