"""Triton kernels of fmn's ops. Importing a module here imports triton."""
