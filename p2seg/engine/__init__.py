"""p2seg.engine"""
