"""hemaclip.train"""
