"""hemaclip.serve"""
