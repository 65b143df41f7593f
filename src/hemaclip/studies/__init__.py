"""hemaclip.studies"""
