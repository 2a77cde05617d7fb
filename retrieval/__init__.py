"""tipslab.retrieval"""
