"""hemaclip.data"""
