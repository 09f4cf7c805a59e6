"""mAP and the other metrics, label recovery, tables against the paper, plots."""
