"""hemaclip.eval"""
