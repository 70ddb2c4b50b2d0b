"""p2seg.tools"""
