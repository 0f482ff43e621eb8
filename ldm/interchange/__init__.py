"""Weights in and out of the ecosystem's layouts: diffusers folders, original SD single files, CLIP text towers."""
