"""C++ CPU kernels over packed quantized weights (``model.quant.packed``), one op per file, built on first use by
``extension`` (``make install`` builds them ahead of time). AVX-512 VNNI, AVX2 or scalar, chosen at run time;
``DOTS_SERVE_CPU_ISA=avx2|scalar`` forces a lower path."""
