# CPU of all workers against the number of workers (bench/scale.lua).
# gnuplot -e "datafile='scale.dat'; outfile='scale.png'" bench/scale.gp
# scale.dat: one block per key count, each with its own header line.
set terminal pngcairo size 900,560 noenhanced font ",10"
set output outfile
set title "CPU of counting + sync, all workers together, beyond the key loop alone\nevery worker dirties the same K keys once per second and syncs every second"
set xlabel "nginx workers"
set ylabel "CPU ms per second, all workers"
set grid
set key outside bottom center horizontal maxrows 2
set bmargin 7
stats datafile using 1 nooutput
nblocks = STATS_blocks
ncols = 4
plot for [b=0:nblocks-1] for [i=2:ncols] datafile index b using 1:i \
     with linespoints lw 2 pt 7 title columnheader(i)
