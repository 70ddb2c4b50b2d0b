"""p2seg.evaluation"""
