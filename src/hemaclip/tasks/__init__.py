"""hemaclip.tasks"""
