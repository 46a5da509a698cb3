"""Names shared by the Torch-Pruning adapter's modules."""

FOLDS = ("mean", "min", "max")
IMPORTANCES = ("auto", "magnitude", "taylor", "gradient")
TOKEN_PARAMS = ("pos_embed", "cls_token", "dist_token", "reg_token")
