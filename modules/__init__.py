"""tipslab.modules"""
