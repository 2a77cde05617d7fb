"""tipslab.datamodules"""
